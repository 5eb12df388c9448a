"""Text-encoder LoRA adapters on a live SDXL pipeline: loaded by name next to the UNet's, switched on together at
the request's scales, switched off exactly.

Each set of trained weights that carries text-encoder LoRAs (PEFT factors by the live encoder's module paths, see
``pti.formats.text_encoder_lora.live_lora``) gets a PEFT adapter of the same name in ``text_encoder`` and/or
``text_encoder_2``. An adapter scales as
``scale * alpha / rank``, like the UNet's; with no adapter active every LoRA layer is disabled, so the encoders
compute exactly what the base ones do.
"""

from __future__ import annotations

import warnings

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

from pti.inference.weights_cache import WeightsError


class AdapterWeights(Protocol):
    """One encoder's LoRA: ``<module>.lora_A.weight``/``.lora_B.weight`` by live module path, alpha per module
    (what ``pti.formats.peft_lora.PeftLora`` holds)."""

    state: dict[str, Tensor]
    alphas: dict[str, float]

    @property
    def modules(self) -> list[str]: ...

    @property
    def ranks(self) -> dict[str, int]: ...


EncoderLoras = Mapping[str, AdapterWeights]  # component name (text_encoder, text_encoder_2) -> its LoRA


class TextEncoderAdapters:
    """The LoRA adapters of the two text encoders, by component name (``text_encoder``, ``text_encoder_2``)."""

    def __init__(self, encoders: dict[str, torch.nn.Module]):
        self.encoders = encoders

    def check(self, loras: EncoderLoras, label: str) -> None:
        """Refuse a LoRA whose modules or shapes are not this base model's encoders'."""
        for component, lora in loras.items():
            modules = dict(self.encoders[component].named_modules())
            for module in lora.modules:
                target = modules.get(module)
                target = getattr(target, "base_layer", target)
                if not isinstance(target, torch.nn.Linear):
                    raise WeightsError(f"{label}: {component} LoRA adapts {module!r}, which this base model's text "
                                       "encoder lacks (weights trained for another base model?)")
                down, up = lora.state[module + ".lora_A.weight"], lora.state[module + ".lora_B.weight"]
                if down.shape[1] != target.in_features or up.shape[0] != target.out_features:
                    raise WeightsError(f"{label}: {component} LoRA for {module} has shapes {list(down.shape)}/"
                                       f"{list(up.shape)} but the layer is {target.in_features}->"
                                       f"{target.out_features} (weights trained for another base model?)")

    def load(self, adapter: str, loras: EncoderLoras) -> None:
        """Add ``adapter`` to each encoder ``loras`` names, with exactly its factors (no LoRA layer elsewhere)."""
        for component, lora in loras.items():
            self._load_one(self.encoders[component], adapter, lora)

    def _load_one(self, encoder: torch.nn.Module, adapter: str, lora: AdapterWeights) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        ranks, alphas = lora.ranks, lora.alphas
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(lora.modules),
                            rank_pattern={m: r for m, r in ranks.items() if r != rank},
                            alpha_pattern={m: a for m, a in alphas.items() if a != alpha})
        with warnings.catch_warnings():
            # Several adapters in one encoder is the point here, not a mistake.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, encoder, adapter_name=adapter)
        with torch.no_grad():
            for module in lora.modules:
                layer = encoder.get_submodule(module)
                for factor, suffix in ((layer.lora_A[adapter].weight, ".lora_A.weight"),
                                       (layer.lora_B[adapter].weight, ".lora_B.weight")):
                    factor.copy_(lora.state[module + suffix].to(device=factor.device, dtype=factor.dtype))

    def adapter_names(self) -> set[str]:
        return {name for layer in self._layers() for name in layer.lora_A}

    def _layers(self) -> list[torch.nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [m for encoder in self.encoders.values() for m in encoder.modules() if isinstance(m, LoraLayer)]

    def activate(self, adapters: list[str], scales: list[float]) -> None:
        """Make exactly ``adapters`` active, each at its scale (times its alpha/rank); none: :meth:`disable`."""
        if not adapters:
            self.disable()
            return
        for layer in self._layers():
            layer.enable_adapters(True)
            layer.set_adapter(adapters)
            for adapter, scale in zip(adapters, scales):
                layer.set_scale(adapter, scale)

    def disable(self) -> None:
        for layer in self._layers():
            layer.enable_adapters(False)

    def delete(self, adapters: list[str]) -> None:
        for layer in self._layers():
            for adapter in adapters:
                if adapter in layer.lora_A:
                    layer.delete_adapter(adapter)
