"""Max-norm regularisation of LoRA weights (kohya's ``scale_weight_norms``).

After every optimizer step, each LoRA module's weight change ``scaling * up @ down`` whose Frobenius norm exceeds
``max_norm`` is scaled back to ``max_norm``: both factors by the square root of the ratio, so their product by the
ratio. A module's update cannot grow without bound, which keeps a LoRA from over-cooking and mixing badly with
others (kohya-ss/sd-scripts#545). Optimizer state is left as it is, as in kohya.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADAPTER = "default"  # the adapter name diffusers' add_adapter gives the trained LoRA


@dataclass(frozen=True)
class NormStats:
    """One application: how many modules were scaled, and the mean and largest norm afterwards."""

    keys_scaled: int
    mean_norm: float
    max_norm: float

    def as_config(self) -> dict:
        return {"keys_scaled": self.keys_scaled, "mean_norm": self.mean_norm, "max_norm": self.max_norm}


def lora_layers(model: torch.nn.Module, adapter: str = ADAPTER) -> list[torch.nn.Module]:
    """The PEFT LoRA layers of ``model`` that hold ``adapter`` (their ``lora_A``/``lora_B`` factors)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def delta_norm(layer: torch.nn.Module, adapter: str = ADAPTER) -> torch.Tensor:
    """Frobenius norm of the layer's weight change ``scaling * B @ A`` (conv kernels flattened), in float64.

    ``|B A|^2 = sum((B^T B) * (A A^T))``: two rank x rank products instead of the full out x in matrix."""
    down = layer.lora_A[adapter].weight.detach().flatten(1).double()
    up = layer.lora_B[adapter].weight.detach()
    if up.dim() > 2 and any(size != 1 for size in up.shape[2:]):  # an up factor with a spatial kernel
        return layer.get_delta_weight(adapter).detach().double().norm()
    up = up.flatten(1).double()
    squared = ((up.T @ up) * (down @ down.T)).sum().clamp_min(0.0)
    return squared.sqrt() * abs(float(layer.scaling[adapter]))


@torch.no_grad()
def apply_max_norm(model: torch.nn.Module, max_norm: float, adapter: str = ADAPTER) -> NormStats:
    """Scale every LoRA layer of ``model`` whose weight change is longer than ``max_norm`` back to ``max_norm``."""
    scaled, norms = 0, []
    for layer in lora_layers(model, adapter):
        norm = float(delta_norm(layer, adapter))
        if norm > max_norm:
            factor = (max_norm / norm) ** 0.5
            layer.lora_A[adapter].weight.mul_(factor)
            layer.lora_B[adapter].weight.mul_(factor)
            scaled += 1
            norm = max_norm
        norms.append(norm)
    if not norms:
        return NormStats(0, 0.0, 0.0)
    return NormStats(scaled, sum(norms) / len(norms), max(norms))
