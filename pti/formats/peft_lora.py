"""The PEFT LoRA state dict every layout converts to and from (:mod:`lora_formats` for the UNet,
:mod:`text_encoder_lora` for the text encoders), and the one error they raise."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

_PEFT_A, _PEFT_B, _PEFT_MAGNITUDE = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"


class LoraFormatError(ValueError):
    """A state dict that is not in the layout a converter expects (one-line message naming the key)."""


@dataclass(frozen=True)
class PeftLora:
    """A UNet LoRA in PEFT layout with its scale: ``alphas[module] / rank(module)`` multiplies ``B @ A``."""

    state: dict[str, Tensor]
    alphas: dict[str, float]

    @property
    def modules(self) -> list[str]:
        return sorted(self.alphas)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: int(self.state[m + _PEFT_A].shape[0]) for m in self.alphas}

    @property
    def use_dora(self) -> bool:
        return any(k.endswith(_PEFT_MAGNITUDE) for k in self.state)


def peft_modules(state: dict[str, Tensor]) -> list[str]:
    """The adapted module paths of a PEFT UNet LoRA state dict; refuses keys that are not LoRA/DoRA tensors."""
    modules = set()
    for key in state:
        for suffix in (_PEFT_A, _PEFT_B, _PEFT_MAGNITUDE):
            if key.endswith(suffix):
                modules.add(key[: -len(suffix)])
                break
        else:
            raise LoraFormatError(f"PEFT LoRA key {key!r} is not a lora_A/lora_B weight or a DoRA magnitude vector")
    for module in modules:
        if module + _PEFT_A not in state or module + _PEFT_B not in state:
            raise LoraFormatError(f"PEFT LoRA module {module!r} lacks its lora_A or lora_B weight")
    return sorted(modules)
