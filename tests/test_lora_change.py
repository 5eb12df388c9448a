"""pti.formats.lora_change: per-module weight-change norms of a kohya LoRA file, summarised per model part."""

from __future__ import annotations

import pytest
import torch

from pti.formats.lora_change import LoraChangeError, change_by_part, layer_change_norms


def module(state, layer, up, down, alpha=None):
    state[f"{layer}.lora_up.weight"] = torch.tensor(up, dtype=torch.float32)
    state[f"{layer}.lora_down.weight"] = torch.tensor(down, dtype=torch.float32)
    if alpha is not None:
        state[f"{layer}.alpha"] = torch.tensor(float(alpha))


def test_norm_is_alpha_over_rank_times_the_product():
    # rank 2, alpha 1: up @ down = up (norm 5), scaled by 1/2
    state = {}
    module(state, "lora_unet_a", [[3.0, 0.0], [0.0, 4.0]], [[1.0, 0.0], [0.0, 1.0]], alpha=1)
    module(state, "lora_te1_b", [[3.0], [4.0]], [[1.0, 0.0]])  # no alpha: alpha = rank, scale 1
    state["bundle_emb.TOK.clip_l"] = torch.zeros(2, 8)  # an embedding, not a LoRA module
    norms = layer_change_norms(state)
    assert norms == {"lora_te1_b": pytest.approx(5.0), "lora_unet_a": pytest.approx(2.5)}


def test_conv_factors_are_flattened():
    state = {"lora_unet_conv.lora_down.weight": torch.ones(1, 2, 3, 3),
             "lora_unet_conv.lora_up.weight": torch.ones(4, 1, 1, 1)}
    # up @ down is a 4 x 18 matrix of ones: norm sqrt(72)
    assert layer_change_norms(state)["lora_unet_conv"] == pytest.approx(72 ** 0.5)


def test_parts_name_their_largest_module():
    state = {}
    module(state, "lora_unet_small", [[1.0]], [[1.0]])
    module(state, "lora_unet_big", [[6.0]], [[1.0]])
    module(state, "lora_unet_mid", [[2.0]], [[1.0]])
    module(state, "lora_te2_only", [[0.5]], [[1.0]])
    (unet, te2) = change_by_part(state)
    assert (unet.part, unet.modules, unet.median, unet.largest, unet.largest_layer) == ("unet", 3, 2.0, 6.0,
                                                                                        "lora_unet_big")
    assert (te2.part, te2.modules, te2.largest) == ("te2", 1, 0.5)


def test_a_module_without_its_up_factor_is_named():
    with pytest.raises(LoraChangeError, match="lora_unet_x: has .lora_down.weight but no .lora_up.weight"):
        layer_change_norms({"lora_unet_x.lora_down.weight": torch.ones(1, 2)})
