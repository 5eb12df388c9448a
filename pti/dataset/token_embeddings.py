"""TokenEmbeddingsHandler: owns the new tokens in both SDXL tokenizers and text encoders for the whole run."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pti.dataset.errors import DatasetError

ENCODER_KEYS = ("clip_l", "clip_g")  # first and second SDXL text encoder


class TokenEmbeddingsHandler:
    """The new tokens in both tokenizers and text encoders: add, initialise, train, export.

    Only the new rows train. Each encoder gets a float32 parameter of its new rows ([n, d], in :attr:`rows`) that
    a forward hook on its token-embedding module substitutes for the lookups of the new ids, so gradients reach
    those rows alone: no dense [vocab, d] gradient or optimizer state, and the table (in the encoder's dtype) is
    never written except for the new rows, which :meth:`retract_embeddings` copies in after every optimizer step
    (after renormalising their std, as cog-sdxl does). Every other row stays bit-identical by construction.
    """

    def __init__(self, text_encoders: list[torch.nn.Module], tokenizers: list):
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.tokens: list[str] = []
        self.token_ids: list[torch.Tensor] = []  # per encoder, ids of the new rows (consecutive)
        self.rows: list[torch.nn.Parameter] = []  # per encoder, the new rows in float32: what trains
        self.table_stds: list[float] = []

    def tables(self) -> list[torch.Tensor]:
        return [enc.get_input_embeddings().weight for enc in self.text_encoders]

    def add_tokens(self, tokens: list[str], init_word: str | None = None, generator: torch.Generator | None = None):
        """Add ``tokens`` to both tokenizers/encoders. Rows start random (normal, scaled to the table's std) or,
        with ``init_word``, as the mean of that word's token embeddings."""
        self.tokens = list(tokens)
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            if any(t in tokenizer.get_vocab() for t in tokens):
                raise DatasetError(f"tokenizer already contains one of {tokens}; pick another token_string")
            tokenizer.add_tokens(tokens)
            ids = torch.tensor(tokenizer.convert_tokens_to_ids(tokens))
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            table = encoder.get_input_embeddings().weight.requires_grad_(False)
            if ids.tolist() != list(range(table.shape[0] - len(tokens), table.shape[0])):
                raise RuntimeError(f"new tokens got ids {ids.tolist()}, not the last rows of a {table.shape[0]}-row table")
            with torch.no_grad():
                old_rows = torch.ones(table.shape[0], dtype=torch.bool)
                old_rows[ids] = False
                std = table[old_rows].float().std().item()
                initial = self._initial_rows(tokenizer, table, ids, std, init_word, generator)
                table[ids.to(table.device)] = initial.to(table.device, table.dtype)
            self.token_ids.append(ids)
            self.table_stds.append(std)
            self.rows.append(torch.nn.Parameter(initial.float().to(table.device), requires_grad=False))
            encoder.get_input_embeddings().register_forward_hook(self._substitution_hook(len(self.rows) - 1))

    def _substitution_hook(self, index: int):
        """Forward hook of encoder ``index``'s token embedding: the new ids' outputs come from ``rows[index]``."""

        first = int(self.token_ids[index][0])

        def substitute(module, args, output):
            input_ids, rows = args[0], self.rows[index]
            is_new = (input_ids >= first).unsqueeze(-1)
            from_rows = rows[(input_ids - first).clamp(0, len(rows) - 1)].to(output.dtype)
            return torch.where(is_new, from_rows, output)  # no branch on the data: no host-device sync

        return substitute

    @staticmethod
    def _initial_rows(tokenizer, table, ids, std, init_word, generator) -> torch.Tensor:
        if init_word is None:
            noise = torch.randn(len(ids), table.shape[1], generator=generator)
            return noise * std
        word_ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not word_ids:
            raise DatasetError(f"token_init_word {init_word!r} tokenizes to nothing; pick a real word")
        return table[torch.tensor(word_ids)].float().mean(dim=0, keepdim=True).expand(len(ids), -1).clone().cpu()

    def set_trainable(self, trainable: bool) -> None:
        for rows in self.rows:
            rows.requires_grad_(trainable)
            if not trainable:
                rows.grad = None

    @torch.no_grad()
    def retract_embeddings(self) -> None:
        """Pull the new rows' std gently towards the table's std and copy them into the tables."""
        for rows, std in zip(self.rows, self.table_stds):
            off_ratio = std / rows.std().clamp_min(1e-12)
            rows.mul_(off_ratio**0.1)
        self._write_rows_to_tables()

    @torch.no_grad()
    def _write_rows_to_tables(self) -> None:
        for table, ids, rows in zip(self.tables(), self.token_ids, self.rows):
            table[ids.to(table.device)] = rows.to(table.dtype)

    def embeddings(self) -> dict[str, torch.Tensor]:
        """``{"clip_l": [n, d1], "clip_g": [n, d2]}``, rows in token order, float32 on CPU."""
        return {key: rows.detach().float().cpu().contiguous() for key, rows in zip(ENCODER_KEYS, self.rows)}

    @torch.no_grad()
    def load_embeddings(self, embeddings: dict[str, torch.Tensor]) -> None:
        for key, rows in zip(ENCODER_KEYS, self.rows):
            rows.copy_(embeddings[key].to(rows.device, rows.dtype))
        self._write_rows_to_tables()

    def save(self, path: Path) -> None:
        save_file(self.embeddings(), str(path))

    def load(self, path: Path) -> None:
        self.load_embeddings(load_file(str(path)))
