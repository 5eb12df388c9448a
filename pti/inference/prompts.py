"""Prompts as AUTOMATIC1111 reads them: attention weights and prompts of any length, encoded for SDXL.

* :func:`parse_prompt` reads A1111's emphasis syntax: ``(text)`` multiplies the attention to ``text`` by 1.1,
  ``[text]`` divides it by 1.1, ``(text:1.3)`` sets the factor, brackets nest (factors multiply), ``\\(``, ``\\)``,
  ``\\[``, ``\\]`` and ``\\\\`` are the literal characters, an unmatched closing bracket is text, an unclosed
  opening bracket weighs everything after it, and the word ``BREAK`` starts a new chunk.
* :func:`encode_prompt` encodes a parsed prompt with each text encoder the A1111 way: the tokens go in chunks of
  75 (``model_max_length - 2``), each chunk framed by the start and end tokens and padded like the tokenizer pads,
  each encoded on its own; the chunks' penultimate hidden states are concatenated along the sequence, the
  encoders' along the features (CLIP-L then CLIP-G for the SDXL base, CLIP-G alone for the refiner), and the pooled
  embedding is the last encoder's of the first chunk. A weighted token's hidden state is multiplied by its weight,
  then the chunk is rescaled to its unweighted mean (A1111's default "Original" emphasis).
* :func:`encode_pair` does both prompts of classifier-free guidance, padding the shorter to the same number of
  chunks with empty chunks, and gives the empty negative prompt zeros where the pipeline asks for it
  (``force_zeros_for_empty_prompt``, as diffusers does).

A prompt of one unweighted chunk encodes to exactly what diffusers' ``encode_prompt`` gives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
BREAK = "BREAK"

_TOKENS = re.compile(r"""
    \\[()\[\]\\]                         # an escaped bracket or backslash
  | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)  # ':1.3)': the weight closing a round bracket
  | [()\[\]]                            # a bracket
  | \bBREAK\b                           # a chunk break
  | [^\\()\[\]:B]+ | B | : | \\          # text
""", re.VERBOSE)


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one attention weight; ``chunk_break`` marks a ``BREAK`` (its text is empty)."""

    text: str
    weight: float = 1.0
    chunk_break: bool = False


def parse_prompt(prompt: str) -> list[Fragment]:
    """The prompt as text runs with their weights, adjacent runs of equal weight merged."""
    pieces: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKENS.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0, False])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE_FACTOR)
        elif token == BREAK:
            pieces.append(["", 1.0, True])
        else:
            pieces.append([token, 1.0, False])
    for start in round_open:
        scale(start, ROUND_FACTOR)
    for start in square_open:
        scale(start, SQUARE_FACTOR)
    return _merged(pieces)


def _merged(pieces: list[list]) -> list[Fragment]:
    fragments: list[Fragment] = []
    for text, weight, is_break in pieces:
        if is_break:
            fragments.append(Fragment("", 1.0, True))
        elif fragments and not fragments[-1].chunk_break and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        elif text:
            fragments.append(Fragment(text, weight))
    return fragments or [Fragment("")]


def unweighted_text(fragments: Sequence[Fragment]) -> str:
    """The prompt's text without the syntax (for logs and length figures)."""
    return "".join(" " if f.chunk_break else f.text for f in fragments)


# ---------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Chunk:
    """One encoder input: start, up to ``model_max_length - 2`` tokens, end, padding; a weight per position."""

    ids: list[int]
    weights: list[float]


def token_chunks(fragments: Sequence[Fragment], tokenizer) -> list[Chunk]:
    """The fragments' tokens in chunks of ``tokenizer.model_max_length - 2``, framed and padded as the tokenizer
    frames and pads one prompt."""
    size = tokenizer.model_max_length - 2
    groups: list[tuple[list[int], list[float]]] = [([], [])]
    for fragment in fragments:
        if fragment.chunk_break:
            groups.append(([], []))
            continue
        ids = tokenizer(fragment.text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        for token in ids:
            if len(groups[-1][0]) == size:
                groups.append(([], []))
            groups[-1][0].append(token)
            groups[-1][1].append(fragment.weight)
    groups = [g for g in groups if g[0]] or [([], [])]
    return [_framed(ids, weights, tokenizer) for ids, weights in groups]


def _framed(ids: list[int], weights: list[float], tokenizer) -> Chunk:
    padding = tokenizer.model_max_length - 2 - len(ids)
    return Chunk(ids=[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding,
                 weights=[1.0, *weights, 1.0] + [1.0] * padding)


def empty_chunk(tokenizer) -> Chunk:
    return _framed([], [], tokenizer)


# ---------------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Conditioning:
    """``embeds`` [1, 77 x chunks, sum of encoder widths]; ``pooled`` [1, last encoder's projection width]."""

    embeds: torch.Tensor
    pooled: torch.Tensor


def _encode_chunk(chunk: Chunk, encoder, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([chunk.ids], device=device)
    output = encoder(ids, output_hidden_states=True)
    hidden = output.hidden_states[-2]
    weights = torch.tensor(chunk.weights, device=device, dtype=hidden.dtype)
    if bool((weights != 1).any()):
        mean = hidden.float().mean()
        hidden = hidden * weights[None, :, None]
        hidden = hidden * (mean / hidden.float().mean()).to(hidden.dtype)
    return hidden, output[0]


def encode_chunks(chunk_lists: Sequence[Sequence[Chunk]], encoders: Sequence) -> Conditioning:
    """Encode each encoder's chunks (one list per encoder, same count): hidden states concatenated along the
    sequence per encoder and along the features across encoders; pooled from the last encoder's first chunk."""
    per_encoder = []
    pooled = None
    for chunks, encoder in zip(chunk_lists, encoders):
        device = encoder.device
        states = [_encode_chunk(chunk, encoder, device) for chunk in chunks]
        per_encoder.append(torch.cat([hidden for hidden, _ in states], dim=1))
        pooled = states[0][1]
    embeds = torch.cat(per_encoder, dim=-1)
    return Conditioning(embeds=embeds.to(dtype=encoders[-1].dtype), pooled=pooled.to(dtype=encoders[-1].dtype))


def _padded(chunks: list[Chunk], count: int, tokenizer) -> list[Chunk]:
    return chunks + [empty_chunk(tokenizer)] * (count - len(chunks))


def encode_prompt(fragments: Sequence[Fragment], tokenizers: Sequence, encoders: Sequence,
                  min_chunks: int = 1) -> Conditioning:
    """One prompt through every (tokenizer, encoder) pair, padded with empty chunks to ``min_chunks``."""
    chunk_lists = [token_chunks(fragments, tokenizer) for tokenizer in tokenizers]
    count = max(min_chunks, *(len(chunks) for chunks in chunk_lists))
    return encode_chunks([_padded(c, count, t) for c, t in zip(chunk_lists, tokenizers)], encoders)


def chunk_count(fragments: Sequence[Fragment], tokenizers: Sequence) -> int:
    return max(len(token_chunks(fragments, tokenizer)) for tokenizer in tokenizers)


@dataclass(frozen=True)
class GuidancePair:
    """The four conditioning tensors an SDXL pipeline takes instead of prompts."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return dict(prompt_embeds=self.prompt_embeds, pooled_prompt_embeds=self.pooled_prompt_embeds,
                    negative_prompt_embeds=self.negative_prompt_embeds,
                    negative_pooled_prompt_embeds=self.negative_pooled_prompt_embeds)


def encode_pair(prompt: str, negative_prompt: str, tokenizers: Sequence, encoders: Sequence,
                zeros_for_empty_negative: bool) -> GuidancePair:
    """Both prompts of classifier-free guidance (A1111 syntax), with the same number of chunks."""
    positive_fragments, negative_fragments = parse_prompt(prompt), parse_prompt(negative_prompt)
    zero_negative = zeros_for_empty_negative and negative_prompt == ""
    count = chunk_count(positive_fragments, tokenizers)
    if not zero_negative:
        count = max(count, chunk_count(negative_fragments, tokenizers))
    with torch.no_grad():
        positive = encode_prompt(positive_fragments, tokenizers, encoders, count)
        if zero_negative:
            negative = Conditioning(torch.zeros_like(positive.embeds), torch.zeros_like(positive.pooled))
        else:
            negative = encode_prompt(negative_fragments, tokenizers, encoders, count)
    return GuidancePair(positive.embeds, positive.pooled, negative.embeds, negative.pooled)
