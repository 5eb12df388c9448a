"""LoRA on both SDXL text encoders during training (diffusers' ``--train_text_encoder``, kohya's default for SD).

The adapters sit on the CLIP attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) of both
encoders, as diffusers' advanced SDXL script puts them, and train in float32 beside the frozen (possibly
half-precision) encoder weights, for the first ``text_encoder_frac`` of the optimizer steps (kohya's
``stop_text_encoder_training``); then they are frozen and the trainer may cache the encoders' outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pti.formats import text_encoder_lora as formats

ADAPTER = "default"  # the adapter name transformers' add_adapter gives the trained LoRA


@dataclass(frozen=True)
class TextEncoderLoraSettings:
    rank: int
    alpha: float
    stop_step: int  # the adapters train for optimizer steps [0, stop_step)


class TextEncoderLora:
    """The trained LoRA adapters of the text encoders (``[text_encoder, text_encoder_2]``)."""

    def __init__(self, encoders: list[torch.nn.Module], settings: TextEncoderLoraSettings):
        self.encoders = list(encoders)
        self.settings = settings

    @classmethod
    def attach(cls, encoders: list[torch.nn.Module], settings: TextEncoderLoraSettings) -> TextEncoderLora:
        """Add a Gaussian-initialised LoRA (``lora_B`` zero: the encoders' outputs are unchanged at step 0) to every
        attention projection of each encoder; its factors train in float32."""
        from peft import LoraConfig

        for encoder in encoders:
            encoder.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights="gaussian",
                                           target_modules=list(formats.ATTENTION_PROJECTIONS)))
        lora = cls(encoders, settings)
        for param in lora.parameters():
            param.data = param.data.float()
        lora.set_trainable(True)
        return lora

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every LoRA factor by ``<component>.<parameter name>`` (checkpoints keep them under these names)."""
        return {f"{component}.{name}": param
                for component, encoder in zip(formats.TEXT_ENCODERS, self.encoders)
                for name, param in encoder.named_parameters() if ".lora_" in name}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_parameters().values())

    def trains_at(self, step: int) -> bool:
        return step < self.settings.stop_step

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def set_trainable(self, trainable: bool) -> None:
        """At the stop step the adapters freeze (gradients dropped, so the optimizer leaves them as they are)."""
        for param in self.parameters():
            param.requires_grad_(trainable)
            if not trainable:
                param.grad = None

    def loras(self) -> formats.TextEncoderLoras:
        """Each encoder's LoRA in canonical module names, for export (float32 on CPU)."""
        from peft import get_peft_model_state_dict

        out = {}
        for component, encoder in zip(formats.TEXT_ENCODERS, self.encoders):
            state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(encoder, save_embedding_layers=False).items()}
            out[component] = formats.canonical_lora(state, self.settings.alpha)
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """The factors saved by :meth:`named_parameters` (a checkpoint) copied into place."""
        params = self.named_parameters()
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))

