"""Trigger words: ``TOK`` or ``TOK:2,STY:1`` become runs of new tokens ``<s0><s1>…`` in every caption."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pti.dataset.errors import DatasetError


@dataclass(frozen=True)
class TriggerWord:
    word: str
    tokens: tuple[str, ...]  # e.g. ("<s0>", "<s1>")

    @property
    def replacement(self) -> str:
        return "".join(self.tokens)


def parse_token_string(token_string: str, num_new_tokens: int = 2) -> list[TriggerWord]:
    """``"TOK"`` → TOK gets ``num_new_tokens`` tokens; ``"TOK:2,STY:1"`` → one entry per concept, tokens numbered
    consecutively across concepts (``<s0><s1>`` for TOK, ``<s2>`` for STY)."""
    entries = [part.strip() for part in token_string.split(",") if part.strip()]
    if not entries:
        raise DatasetError("token_string is empty; give a trigger word such as TOK (or TOK:2,STY:1)")
    triggers: list[TriggerWord] = []
    next_index = 0
    for entry in entries:
        word, _, count_text = entry.partition(":")
        word = word.strip()
        if not re.fullmatch(r"\w+", word):
            raise DatasetError(f"trigger word {word!r} in token_string must be a single word of letters/digits/_")
        try:
            count = int(count_text) if count_text else num_new_tokens
        except ValueError:
            raise DatasetError(f"token count {count_text!r} for trigger {word!r} is not an integer") from None
        if count < 1:
            raise DatasetError(f"trigger {word!r} needs at least 1 new token, got {count}")
        if any(t.word == word for t in triggers):
            raise DatasetError(f"trigger word {word!r} appears twice in token_string")
        triggers.append(TriggerWord(word, tuple(f"<s{i}>" for i in range(next_index, next_index + count))))
        next_index += count
    return triggers


def special_params(triggers: list[TriggerWord]) -> dict[str, str]:
    """Trigger word → its new tokens, as written to ``special_params.json``."""
    return {t.word: t.replacement for t in triggers}


def all_new_tokens(triggers: list[TriggerWord]) -> list[str]:
    return [token for t in triggers for token in t.tokens]


def _trigger_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def contains_trigger(caption: str, trigger: TriggerWord) -> bool:
    return _trigger_pattern(trigger.word).search(caption) is not None


def replace_trigger_words(caption: str, triggers: list[TriggerWord]) -> str:
    """Whole-word, case-exact replacement: ``TOK`` → ``<s0><s1>``; ``TOKYO`` and ``tok`` stay as they are."""
    for trigger in triggers:
        caption = _trigger_pattern(trigger.word).sub(trigger.replacement, caption)
    return caption
