"""How far a kohya-layout LoRA file moves each layer it adapts: the Frobenius norm of ``alpha / rank · up @ down``,
the weight change a consumer adds at scale 1, summarised per model part (UNet, first and second text encoder).

A module far larger than its part's median is where a run went wrong first (bench/README.md: one text-encoder
module at 12 times the median broke the toy encoder). Pure functions on state dicts."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from torch import Tensor

from pti.formats.lora_formats import KOHYA_PREFIX, KOHYA_TEXT_ENCODER_PREFIXES

PARTS = {KOHYA_PREFIX: "unet", KOHYA_TEXT_ENCODER_PREFIXES[0]: "te1", KOHYA_TEXT_ENCODER_PREFIXES[1]: "te2"}
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


class LoraChangeError(ValueError):
    """A kohya LoRA module without both factors."""


@dataclass(frozen=True)
class PartChange:
    """The weight changes of one model part: how many modules, their median and largest norm, and where."""

    part: str
    modules: int
    median: float
    largest: float
    largest_layer: str


def layer_change_norms(state: dict[str, Tensor]) -> dict[str, float]:
    """``{kohya layer name: |alpha / rank · up @ down|}`` for every LoRA module (conv kernels flattened; a missing
    alpha means alpha = rank, as kohya reads it). Keys that are not LoRA factors (bundled embeddings) are skipped."""
    norms = {}
    for key in sorted(state):
        if not key.endswith(_DOWN):
            continue
        layer = key[: -len(_DOWN)]
        if layer + _UP not in state:
            raise LoraChangeError(f"{layer}: has {_DOWN} but no {_UP}")
        down = state[key].double().flatten(1)
        up = state[layer + _UP].double().flatten(1)
        rank = down.shape[0]
        alpha = float(state[layer + _ALPHA]) if layer + _ALPHA in state else float(rank)
        norms[layer] = float((up @ down).norm()) * alpha / rank
    return norms


def part_of(layer: str) -> str:
    """``unet``, ``te1`` or ``te2`` from a kohya layer name's prefix."""
    for prefix, part in PARTS.items():
        if layer.startswith(prefix):
            return part
    raise LoraChangeError(f"{layer}: not a kohya LoRA layer name (lora_unet_, lora_te1_ or lora_te2_)")


def change_by_part(state: dict[str, Tensor]) -> list[PartChange]:
    """One summary per model part the file adapts, in the order unet, te1, te2."""
    grouped: dict[str, dict[str, float]] = {part: {} for part in PARTS.values()}
    for layer, norm in layer_change_norms(state).items():
        grouped[part_of(layer)][layer] = norm
    summaries = []
    for part, norms in grouped.items():
        if not norms:
            continue
        largest_layer = max(norms, key=norms.__getitem__)
        summaries.append(PartChange(part=part, modules=len(norms), median=statistics.median(norms.values()),
                                    largest=norms[largest_layer], largest_layer=largest_layer))
    return summaries
