"""Automatic gradient checkpointing: the activation estimate is measured on the real (tiny) UNet and decides."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from pti.training import memory_fit
from pti.models.base_model import load_sdxl_pipeline, pick_runtime

RUNTIME = pick_runtime("fp32", "cpu")


@pytest.fixture(scope="module")
def lora_unet():
    unet = load_sdxl_pipeline("tiny", RUNTIME).unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet


def probe(unet, side: int) -> int:
    return memory_fit.saved_activation_bytes(
        unet, torch.zeros(1, 4, side, side), torch.zeros(1, 77, unet.config.cross_attention_dim),
        {"text_embeds": torch.zeros(1, 64), "time_ids": torch.zeros(1, 6)}, RUNTIME.autocast())


def test_saved_activations_grow_with_the_latent_area(lora_unet):
    small, large = probe(lora_unet, 16), probe(lora_unet, 32)
    assert 3.0 < large / small < 4.5  # nearly proportional to the area (a small part does not depend on it)


def test_checkpointing_switches_on_only_when_memory_is_short(lora_unet, monkeypatch):
    def decide(free: int) -> bool:
        monkeypatch.setattr(memory_fit, "free_bytes", lambda device: free)
        return memory_fit.needs_gradient_checkpointing(
            lora_unet, batch_size=2, latent_size=(32, 32), text_shape=(77, lora_unet.config.cross_attention_dim),
            pooled_dim=64, device=torch.device("cpu"), autocast=RUNTIME.autocast())

    needed = probe(lora_unet, 32) * 2
    assert decide(100 * needed) is False
    assert decide(needed // 2) is True
