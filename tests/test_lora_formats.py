"""Key-layout converters: names checked against diffusers' own SGM parsers, exact round trips, a real adapter."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig, get_peft_model_state_dict

from pti.formats import lora_formats as lf
from pti.models.tiny_models import tiny_configs
from weights_fixtures import cog_sdxl_lora_by_hand

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
TINY_UNET_CONFIG = tiny_configs(vocab_size=1000)["unet"]

# Names as kohya sd-scripts / A1111 / ComfyUI spell them for SDXL (from the SGM UNet's module paths).
KNOWN_SDXL_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_out.0":
        "input_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
    "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_v": "input_blocks_8_1_transformer_blocks_9_attn1_to_v",
    "mid_block.attentions.0.transformer_blocks.3.attn2.to_k": "middle_block_1_transformer_blocks_3_attn2_to_k",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "output_blocks_0_1_transformer_blocks_0_attn1_to_q",
    "up_blocks.0.attentions.2.proj_in": "output_blocks_2_1_proj_in",
    "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.0.proj":
        "output_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks_3_1_transformer_blocks_0_ff_net_2",
    "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
    "down_blocks.1.downsamplers.0.conv": "input_blocks_6_0_op",
    "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    "up_blocks.2.resnets.2.conv2": "output_blocks_8_0_out_layers_3",
    "conv_in": "input_blocks_0_0",
    "time_embedding.linear_1": "time_embed_0",
    "add_embedding.linear_2": "label_emb_0_2",
    "conv_out": "out_2",
}


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def adapted_module_names(unet: UNet2DConditionModel) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize(("diffusers_name", "kohya_name"), KNOWN_SDXL_NAMES.items())
def test_known_sdxl_kohya_names(diffusers_name, kohya_name):
    assert lf.kohya_layer_name(diffusers_name, lf.SDXL_UNET_LAYOUT) == "lora_unet_" + kohya_name
    assert lf.diffusers_module_from_kohya("lora_unet_" + kohya_name, lf.SDXL_UNET_LAYOUT) == diffusers_name


@pytest.mark.parametrize("config", [SDXL_UNET_CONFIG, TINY_UNET_CONFIG], ids=["sdxl", "tiny"])
def test_every_unet_parameter_maps_to_the_sgm_name_diffusers_single_file_loader_expects(config):
    """diffusers' converter of original (SGM) SDXL checkpoints is an independent oracle for the whole mapping."""
    unet = meta_unet(config)
    layout = lf.UNetLayout.from_unet_config(unet.config)
    keys = list(unet.state_dict())
    sgm_checkpoint = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        sgm_checkpoint[f"model.diffusion_model.{lf.diffusers_module_to_sgm(module, layout)}.{param}"] = torch.empty(0)
    assert len(sgm_checkpoint) == len(keys)
    assert set(convert_ldm_unet_checkpoint(sgm_checkpoint, dict(unet.config))) == set(keys)


@pytest.mark.parametrize("config", [SDXL_UNET_CONFIG, TINY_UNET_CONFIG], ids=["sdxl", "tiny"])
def test_every_linear_and_conv_kohya_name_round_trips_and_is_unique(config):
    unet = meta_unet(config)
    layout = lf.UNetLayout.from_unet_config(unet.config)
    names = adapted_module_names(unet)
    kohya = [lf.kohya_layer_name(n, layout) for n in names]
    assert len(set(kohya)) == len(names)
    assert [lf.diffusers_module_from_kohya(k, layout) for k in kohya] == names


def test_sdxl_attention_names_are_read_back_by_diffusers_kohya_loader():
    """diffusers' own kohya parser (lora_state_dict) maps our SGM names to the same attention modules."""
    unet = meta_unet(SDXL_UNET_CONFIG)
    names = [n for n in adapted_module_names(unet) if ".attn" in n]
    assert len(names) == 70 * 2 * 4  # 70 transformer blocks in SDXL, 2 attentions each, q/k/v/out
    state = {}
    for n in names:
        layer = lf.kohya_layer_name(n, lf.SDXL_UNET_LAYOUT)
        state[layer + ".lora_down.weight"] = torch.zeros(1, 1)
        state[layer + ".lora_up.weight"] = torch.zeros(1, 1)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    # diffusers' intermediate layout: <attention>.processor.to_q_lora.down.weight (to_out_lora for to_out.0)
    read_back = {k.removeprefix("unet.").replace(".processor.", ".").replace("_lora.down.weight", "")
                 .replace("to_out", "to_out.0") for k in converted if k.endswith("down.weight")}
    assert read_back == set(names)


def test_diffusers_style_kohya_names_are_read_too():
    assert lf.diffusers_module_from_kohya("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("bad", ["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_input_blocks_99_1_proj_in",
                                 "lora_unet_middle_block_7_proj_in", "lora_unet_something_else"])
def test_unknown_kohya_names_are_refused_with_one_line(bad):
    with pytest.raises(lf.LoraFormatError) as err:
        lf.diffusers_module_from_kohya(bad)
    assert "\n" not in str(err.value)


def test_module_outside_the_layout_is_refused():
    tiny = lf.UNetLayout.from_unet_config(TINY_UNET_CONFIG)
    with pytest.raises(lf.LoraFormatError, match="block 2"):
        lf.kohya_layer_name("down_blocks.2.attentions.0.proj_in", tiny)


def random_peft_state(modules: list[str], rank: int = 4, width: int = 8, dora: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for m in modules:
        state[f"{m}.lora_A.weight"] = torch.randn(rank, width, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(width, rank, generator=g)
        if dora:
            state[f"{m}.lora_magnitude_vector"] = torch.rand(width, generator=g) + 0.5
    return state


SOME_SDXL_MODULES = list(KNOWN_SDXL_NAMES)[:8]


def test_peft_kohya_round_trip_is_exact():
    lora = lf.peft_lora(random_peft_state(SOME_SDXL_MODULES), lora_alpha=2.0)
    kohya = lf.peft_to_kohya(lora)
    layer = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert kohya[layer + ".alpha"].item() == 2.0 and kohya[layer + ".alpha"].dim() == 0
    assert torch.equal(kohya[layer + ".lora_down.weight"],
                       lora.state["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    back = lf.kohya_to_peft(kohya)
    assert back.state.keys() == lora.state.keys()
    assert all(torch.equal(back.state[k], v) for k, v in lora.state.items())
    assert back.alphas == lora.alphas


def test_dora_has_no_kohya_layout_either_way():
    with pytest.raises(lf.LoraFormatError, match="DoRA") as err:
        lf.peft_to_kohya(lf.peft_lora(random_peft_state(SOME_SDXL_MODULES[:1], dora=True), lora_alpha=2.0))
    assert "\n" not in str(err.value)
    kohya = lf.peft_to_kohya(lf.peft_lora(random_peft_state(SOME_SDXL_MODULES[:1]), lora_alpha=2.0))
    layer = next(k for k in kohya if k.endswith(".alpha")).removesuffix(".alpha")
    with pytest.raises(lf.LoraFormatError, match="dora_scale"):
        lf.kohya_to_peft({**kohya, layer + ".dora_scale": torch.ones(1, 8)})


def test_kohya_without_alpha_means_scale_one():
    kohya = lf.peft_to_kohya(lf.peft_lora(random_peft_state(SOME_SDXL_MODULES[:1], rank=3), lora_alpha=1.0))
    no_alpha = {k: v for k, v in kohya.items() if not k.endswith(".alpha")}
    assert set(lf.kohya_to_peft(no_alpha).alphas.values()) == {3.0}


def test_diffusers_file_round_trip_keeps_alpha_and_rank_pattern():
    state = random_peft_state(SOME_SDXL_MODULES[:3])
    state.update(random_peft_state(SOME_SDXL_MODULES[3:4], rank=2))
    lora = lf.peft_lora(state, lora_alpha=6.0)
    tensors, metadata = lf.peft_to_diffusers_file(lora)
    assert all(k.startswith("unet.") for k in tensors)
    back = lf.diffusers_file_to_peft(tensors, metadata)
    assert back.alphas == lora.alphas
    assert lf.peft_adapter_metadata(back)["rank_pattern"] == {SOME_SDXL_MODULES[3]: 2}


@pytest.mark.parametrize("bad_key", ["down_blocks.1.attentions.0.proj_in.weight", "x.lora_A.bias"])
def test_non_lora_peft_keys_are_refused(bad_key):
    state = random_peft_state(SOME_SDXL_MODULES[:1])
    state[bad_key] = torch.zeros(1)
    with pytest.raises(lf.LoraFormatError, match="lora_A/lora_B"):
        lf.peft_lora(state, 4.0)


def test_bundled_embeddings_read_back_as_rows_and_trigger_words():
    emb = {"clip_l": torch.arange(3 * 4.0).reshape(3, 4), "clip_g": torch.arange(3 * 6.0).reshape(3, 6)}
    bundle = lf.split_embeddings_by_trigger(emb, {"TOK": "<s0><s1>", "STY": "<s2>"})
    tables, special = lf.bundled_embeddings(bundle)
    assert special == {"TOK": "<s0><s1>", "STY": "<s2>"}
    assert all(torch.equal(tables[k], emb[k]) for k in emb)
    with pytest.raises(lf.LoraFormatError, match="clip_l and clip_g"):
        lf.bundled_embeddings({"bundle_emb.TOK.clip_l": emb["clip_l"]})


def same_lora(read: lf.PeftLora, expected: lf.PeftLora) -> bool:
    return (read.alphas == expected.alphas and read.state.keys() == expected.state.keys()
            and all(torch.equal(read.state[k], v) for k, v in expected.state.items()))


def test_read_lora_file_reads_every_bare_layout_to_the_same_lora():
    modules = [m for m in SOME_SDXL_MODULES if ".attn" in m]
    lora = lf.peft_lora(random_peft_state(modules), 4.0)  # alpha = rank: scale 1, as cog-sdxl and old diffusers
    kohya = lf.peft_to_kohya(lora)
    tensors, metadata = lf.peft_to_diffusers_file(lora)
    old_diffusers = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
                     for k, v in tensors.items()}
    cog = lf.peft_to_cog_sdxl_lora(lora)
    layouts = {"kohya": (kohya, None), "diffusers": (tensors, metadata), "diffusers, no metadata": (tensors, None),
               "old diffusers names": (old_diffusers, None), "cog-sdxl": (cog, None),
               "cog-sdxl with unet.": ({"unet." + k: v for k, v in cog.items()}, None)}
    for name, (file, meta) in layouts.items():
        read = lf.read_lora_file(file, meta)
        assert same_lora(read.lora, lora), name
        assert (read.embeddings, read.special_params, read.skipped_text_encoder_keys) == ({}, {}, 0), name


def test_read_lora_file_reads_sdxl_text_encoder_layers_beside_the_unet_and_bundle():
    """SDXL text-encoder layers are read (tests/test_text_encoder_lora_formats.py has every mapping); SD 1.x's
    lora_te_ keys are left out and counted."""
    lora = lf.peft_lora(random_peft_state(SOME_SDXL_MODULES[:2]), 8.0)
    fc1 = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    text_encoder = {f"{fc1}.lora_down.weight": torch.zeros(4, 8), f"{fc1}.lora_up.weight": torch.zeros(8, 4),
                    f"{fc1}.alpha": torch.tensor(4.0), "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.ones(())}
    bundle = lf.split_embeddings_by_trigger({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)},
                                            {"TOK": "<s0><s1>"})
    read = lf.read_lora_file({**lf.peft_to_kohya(lora), **bundle, **text_encoder}, None)
    assert same_lora(read.lora, lora) and read.skipped_text_encoder_keys == 1
    assert read.text_encoder_loras["text_encoder"].modules == ["text_model.encoder.layers.0.mlp.fc1"]
    assert read.special_params == {"TOK": "<s0><s1>"}
    tensors, metadata = lf.peft_to_diffusers_file(lora)
    peft_text_encoder = {"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 8),
                         "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.zeros(8, 4)}
    read = lf.read_lora_file({**tensors, **peft_text_encoder}, metadata)
    assert same_lora(read.lora, lora) and read.skipped_text_encoder_keys == 0
    assert list(read.text_encoder_loras) == ["text_encoder_2"]


def test_read_lora_file_refuses_what_it_cannot_apply_in_one_line():
    lora = lf.peft_lora(random_peft_state(SOME_SDXL_MODULES[:2]), 8.0)
    kohya = lf.peft_to_kohya(lora)
    tensors, _ = lf.peft_to_diffusers_file(lora)
    layer = next(k for k in kohya if k.endswith(".alpha")).removesuffix(".alpha")
    text_encoder_only = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 1)}
    for bad, message in (({**kohya, layer + ".dora_scale": torch.ones(1, 8)}, "dora_scale"),
                         ({**kohya, **tensors}, "mixes them"), ({}, "no tensors"),
                         (text_encoder_only, "all 1 keys adapt a text encoder"),
                         ({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(1)}, "neither kohya")):
        with pytest.raises(lf.LoraFormatError, match=message) as err:
            lf.read_lora_file(bad, None)
        assert "\n" not in str(err.value)


def test_kohya_file_for_diffusers_drops_bundled_embeddings_only():
    kohya = lf.peft_to_kohya(lf.peft_lora(random_peft_state(SOME_SDXL_MODULES[:2]), 4.0))
    with_emb = {**kohya, "bundle_emb.TOK.clip_l": torch.zeros(2, 768), "bundle_emb.TOK.clip_g": torch.zeros(2, 1280)}
    assert lf.kohya_file_for_diffusers(with_emb).keys() == kohya.keys()


def test_split_embeddings_by_trigger_takes_each_triggers_rows():
    emb = {"clip_l": torch.arange(3 * 4.0).reshape(3, 4), "clip_g": torch.arange(3 * 6.0).reshape(3, 6)}
    bundle = lf.split_embeddings_by_trigger(emb, {"TOK": "<s0><s1>", "STY": "<s2>"})
    assert torch.equal(bundle["bundle_emb.TOK.clip_l"], emb["clip_l"][:2])
    assert torch.equal(bundle["bundle_emb.STY.clip_g"], emb["clip_g"][2:])
    with pytest.raises(lf.LoraFormatError, match="<s5>"):
        lf.split_embeddings_by_trigger(emb, {"TOK": "<s5>"})


def test_cog_sdxl_layout_converts_to_peft_exactly():
    modules = [m for m in SOME_SDXL_MODULES if ".attn" in m]
    state = random_peft_state(modules, rank=4)
    cog = cog_sdxl_lora_by_hand(state, alpha=6.0)  # alpha != rank: the scale 1.5 lives in the up weights
    assert "down_blocks.1.attentions.1.transformer_blocks.1.attn2.processor.to_out_lora.up.weight" in cog
    back = lf.cog_sdxl_lora_to_peft(cog)
    assert back.state.keys() == state.keys()
    assert back.alphas == {m: 4.0 for m in modules}, "cog-sdxl has no alpha: scale 1"
    for m in modules:
        assert torch.equal(back.state[m + ".lora_A.weight"], state[m + ".lora_A.weight"])
        assert torch.equal(back.state[m + ".lora_B.weight"], state[m + ".lora_B.weight"] * 1.5)
    ours = lf.peft_to_cog_sdxl_lora(lf.peft_lora(state, lora_alpha=6.0))
    assert ours.keys() == cog.keys() and all(torch.equal(ours[k], v) for k, v in cog.items())
    emb = lf.cog_sdxl_embeddings({"text_encoders_0": torch.ones(2, 768), "text_encoders_1": torch.ones(2, 1280)})
    assert emb["clip_l"].shape == (2, 768) and emb["clip_g"].shape == (2, 1280)
    with pytest.raises(lf.LoraFormatError, match="text_encoders_1"):
        lf.cog_sdxl_embeddings({"text_encoders_0": torch.ones(2, 768)})
    with pytest.raises(lf.LoraFormatError, match="processor"):
        lf.cog_sdxl_lora_to_peft({"unet.down_blocks.0.resnets.0.conv1.lora.down.weight": torch.ones(1)})


@pytest.fixture(scope="module")
def tiny_unet_adapter_state():
    """A real PEFT LoRA adapter on the tiny UNet, every linear and conv layer targeted, B non-zero."""
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    targets = [n for n in adapted_module_names(unet) if n not in ("conv_in", "conv_out")]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_()
    return lf.UNetLayout.from_unet_config(unet.config), get_peft_model_state_dict(unet), len(targets)


def test_real_tiny_adapter_converts_both_ways_identically(tiny_unet_adapter_state):
    layout, state, n_targets = tiny_unet_adapter_state
    lora = lf.peft_lora(state, lora_alpha=3.0)
    assert len(lora.modules) == n_targets
    kohya = lf.peft_to_kohya(lora, layout)
    assert all(k.startswith("lora_unet_") for k in kohya)
    back = lf.kohya_to_peft(kohya, layout)
    assert back.state.keys() == state.keys()
    assert all(torch.equal(back.state[k], v) for k, v in state.items())
    assert set(back.alphas.values()) == {3.0}
