"""Text-encoder LoRA key layouts (issue 15, point 3): one test per mapping of pti/formats/text_encoder_lora.py, bare
files with text-encoder layers, and the exported files against the real SDXL text encoders (CLIP ViT-L and OpenCLIP
bigG built on the ``meta`` device: names and shapes without weights), with the adapters attached the way training
attaches them.

ComfyUI's and Forge's rule for SDXL text-encoder LoRA keys (``model_lora_keys_clip``, read, not copied): for every
layer ``b`` and module ``c`` of ``self_attn.{q,k,v,out}_proj`` and ``mlp.fc{1,2}``, ``lora_te1_text_model_encoder_
layers_<b>_<c with _>`` patches ``clip_l.transformer.text_model.encoder.layers.<b>.<c>.weight`` and ``lora_te2_…``
the same module of ``clip_g``. A1111's ``networks`` maps ``lora_te1_``/``lora_te2_`` onto the first/second encoder's
``text_model`` modules the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pti.formats import export
from pti.formats import lora_formats as lf
from pti.formats import text_encoder_lora as te
from pti.training.text_encoder_lora import TextEncoderLora, TextEncoderLoraSettings
from test_consumer_formats import ALPHA, CLIP_G, CLIP_L, RANK, materialised, meta_sdxl_unet_with_training_lora

Q0 = "text_model.encoder.layers.0.self_attn.q_proj"


def random_lora(modules: list[str], rank: int = 4, width: int = 8, alpha: float = 2.0, seed: int = 0) -> lf.PeftLora:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module in modules:
        state[module + ".lora_A.weight"] = torch.randn(rank, width, generator=generator)
        state[module + ".lora_B.weight"] = torch.randn(width, rank, generator=generator)
    return lf.PeftLora(state, {m: alpha for m in modules})


def same(a: lf.PeftLora, b: lf.PeftLora) -> bool:
    return a.alphas == b.alphas and a.state.keys() == b.state.keys() and all(
        torch.equal(a.state[k], b.state[k]) for k in a.state)


# ---------------------------------------------------------------------------------------------- names


def test_canonical_names_have_text_model_whatever_the_transformers_layout():
    assert te.canonical_module("encoder.layers.0.self_attn.q_proj") == Q0  # flattened CLIPTextModel (transformers 5)
    assert te.canonical_module(Q0) == Q0  # CLIPTextModelWithProjection keeps text_model
    assert te.live_module(Q0, has_text_model=False) == "encoder.layers.0.self_attn.q_proj"
    assert te.live_module(Q0, has_text_model=True) == Q0
    assert te.pattern_module(Q0) == "encoder.layers.0.self_attn.q_proj"
    with pytest.raises(lf.LoraFormatError, match="not a CLIP attention projection or MLP layer"):
        te.canonical_module("embeddings.token_embedding")


@pytest.mark.parametrize("encoder, module, layer", [
    ("text_encoder", Q0, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder_2", "text_model.encoder.layers.31.self_attn.out_proj",
     "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"),
    ("text_encoder", "text_model.encoder.layers.5.mlp.fc2", "lora_te1_text_model_encoder_layers_5_mlp_fc2"),
])
def test_kohya_layer_names_both_ways(encoder, module, layer):
    assert te.kohya_layer_name(encoder, module) == layer
    assert te.module_from_kohya(layer) == (encoder, module)


@pytest.mark.parametrize("bad", ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                 "lora_te1_text_model_encoder_layers_0_self_attn_to_q",
                                 "lora_te3_text_model_encoder_layers_0_mlp_fc1"])
def test_unknown_kohya_text_encoder_names_are_refused_in_one_line(bad):
    with pytest.raises(lf.LoraFormatError) as error:
        te.module_from_kohya(bad)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- files


def two_encoders() -> te.TextEncoderLoras:
    return {"text_encoder": random_lora([Q0, "text_model.encoder.layers.1.mlp.fc1"], seed=1),
            "text_encoder_2": random_lora([Q0], rank=2, alpha=8.0, seed=2)}


def test_kohya_round_trip_with_alpha():
    loras = two_encoders()
    kohya = te.to_kohya(loras)
    assert kohya["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"].dtype == torch.float32
    assert kohya["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 8.0
    read = te.from_kohya({**kohya, "lora_unet_x.lora_down.weight": torch.ones(1)})  # other keys are not its business
    assert read.keys() == loras.keys() and all(same(read[k], loras[k]) for k in loras)
    no_alpha = te.from_kohya({k: v for k, v in kohya.items() if not k.endswith(".alpha")})
    assert set(no_alpha["text_encoder_2"].alphas.values()) == {2.0}, "no .alpha: alpha = rank, as kohya assumes"
    with pytest.raises(lf.LoraFormatError, match="lacks its lora_down or lora_up"):
        te.from_kohya({k: v for k, v in kohya.items() if not k.endswith(".lora_up.weight")})


def test_diffusers_round_trip_with_metadata_and_older_names():
    loras = two_encoders()
    tensors, config = te.to_diffusers(loras)
    assert set(tensors) == {f"{encoder}.{k}" for encoder, lora in loras.items() for k in lora.state}
    assert config["text_encoder_2.lora_alpha"] == 8.0 and config["text_encoder.r"] == 4
    assert config["text_encoder.target_modules"] == ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]
    metadata = {te.LORA_ADAPTER_METADATA_KEY: json.dumps(config)}
    read = te.from_diffusers({**tensors, "unet.x.lora_A.weight": torch.ones(1)}, metadata)
    assert read.keys() == loras.keys() and all(same(read[k], loras[k]) for k in loras)
    assert set(te.from_diffusers(tensors, None)["text_encoder_2"].alphas.values()) == {2.0}, "no metadata: scale 1"
    old = {k.replace(".lora_A.weight", ".lora_linear_layer.down.weight")
           .replace(".lora_B.weight", ".lora_linear_layer.up.weight"): v for k, v in tensors.items()}
    assert same(te.from_diffusers(old, metadata)["text_encoder"], loras["text_encoder"])
    flattened = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in tensors.items()}
    assert same(te.from_diffusers(flattened, metadata)["text_encoder"], loras["text_encoder"]), "names without text_model"


def unet_lora() -> lf.PeftLora:
    generator = torch.Generator().manual_seed(3)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    return lf.PeftLora({module + ".lora_A.weight": torch.randn(4, 8, generator=generator),
                        module + ".lora_B.weight": torch.randn(8, 4, generator=generator)}, {module: 4.0})


def test_read_lora_file_reads_both_encoders_from_kohya_and_diffusers_files():
    loras, unet = two_encoders(), unet_lora()
    unet_tensors, unet_metadata = lf.peft_to_diffusers_file(unet)
    text_tensors, text_config = te.to_diffusers(loras)
    packed = {**json.loads(unet_metadata[lf.LORA_ADAPTER_METADATA_KEY]), **text_config}
    files = {"kohya": ({**lf.peft_to_kohya(unet), **te.to_kohya(loras)}, None),
             "diffusers": ({**unet_tensors, **text_tensors}, {lf.LORA_ADAPTER_METADATA_KEY: json.dumps(packed)})}
    for name, (tensors, metadata) in files.items():
        read = lf.read_lora_file(tensors, metadata)
        assert same(read.lora, unet), name
        assert read.text_encoder_loras.keys() == loras.keys(), name
        assert all(same(read.text_encoder_loras[k], loras[k]) for k in loras), name
        assert read.skipped_text_encoder_keys == 0, name
    alone = lf.read_lora_file(te.to_kohya(loras), None)
    assert alone.lora is None and alone.text_encoder_loras.keys() == loras.keys(), "a text-encoder-only file"


def test_read_lora_file_skips_other_layouts_text_encoder_keys_and_refuses_mixed_ones():
    unet = lf.peft_to_kohya(unet_lora())
    sd1 = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
           "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}
    read = lf.read_lora_file({**unet, **sd1}, None)
    assert read.skipped_text_encoder_keys == 2 and read.text_encoder_loras == {}
    for bad, message in (({**unet, **te.to_kohya(two_encoders()), **te.to_diffusers(two_encoders())[0]},
                          "mixes layouts"),
                         (sd1, "all 2 keys adapt a text encoder in a layout SDXL has not")):
        with pytest.raises(lf.LoraFormatError, match=message) as error:
            lf.read_lora_file(bad, None)
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- real SDXL shapes


@pytest.fixture(scope="module")
def sdxl_with_text_encoders(tmp_path_factory):
    """The real SDXL-base UNet and text encoders on ``meta``, the LoRAs attached as training attaches them, written by
    the real exporter (the tensors materialised on the CPU)."""
    unet = meta_sdxl_unet_with_training_lora()
    with torch.device("meta"):
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))]
    TextEncoderLora.attach(encoders, TextEncoderLoraSettings(rank=RANK, alpha=ALPHA, stop_step=1))
    loras = {component: te.canonical_lora(materialised(get_peft_model_state_dict(encoder,
                                                                                 save_embedding_layers=False)), ALPHA)
             for component, encoder in zip(te.TEXT_ENCODERS, encoders)}
    embeddings = {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}
    out = tmp_path_factory.mktemp("sdxl_te") / "lora"
    export.write_weight_files(out, unet_lora_state=materialised(get_peft_model_state_dict(unet)), lora_alpha=ALPHA,
                              embeddings=embeddings, special_params={"TOK": "<s0>"}, training_config={},
                              name="subject", unet_layout=lf.UNetLayout.from_unet_config(unet.config),
                              text_encoder_loras=loras)
    return {"out": out, "encoders": dict(zip(("clip_l", "clip_g"), encoders)), "unet": unet}


def comfyui_clip_key_map(encoders: dict[str, torch.nn.Module]) -> dict[str, tuple[str, tuple[int, int]]]:
    """ComfyUI's SDXL text-encoder key map: kohya layer → (checkpoint weight, its [out, in] shape)."""
    key_map = {}
    for prefix, name in (("lora_te1_", "clip_l"), ("lora_te2_", "clip_g")):
        encoder = encoders[name]
        layers = encoder.config.num_hidden_layers
        for block in range(layers):
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "mlp.fc1", "mlp.fc2"):
                live = f"encoder.layers.{block}.{part}"
                module = encoder.get_submodule(live if not hasattr(encoder, "text_model") else "text_model." + live)
                module = getattr(module, "base_layer", module)
                key_map[f"{prefix}text_model_encoder_layers_{block}_{part.replace('.', '_')}"] = (
                    f"{name}.transformer.text_model.{live}.weight", tuple(module.weight.shape))
    return key_map


def test_every_text_encoder_key_of_the_kohya_file_patches_a_real_sdxl_text_encoder_weight(sdxl_with_text_encoders):
    key_map = comfyui_clip_key_map(sdxl_with_text_encoders["encoders"])
    for name in ("subject_kohya", "subject"):
        state = load_file(sdxl_with_text_encoders["out"] / f"{name}.safetensors")
        layers = {k.split(".")[0] for k in state if k.startswith(("lora_te1_", "lora_te2_"))}
        assert len([la for la in layers if la.startswith("lora_te1_")]) == 12 * 4  # CLIP ViT-L: 12 layers x q/k/v/out
        assert len([la for la in layers if la.startswith("lora_te2_")]) == 32 * 4  # OpenCLIP bigG: 32 layers
        assert layers <= set(key_map), sorted(layers - set(key_map))[:3]
        for layer in layers:
            out_features, in_features = key_map[layer][1]
            down, up = state[layer + ".lora_down.weight"], state[layer + ".lora_up.weight"]
            assert down.shape == (RANK, in_features) and up.shape == (out_features, RANK), layer
            assert state[layer + ".alpha"].item() == ALPHA


def test_diffusers_reads_both_files_onto_the_real_text_encoder_modules(sdxl_with_text_encoders):
    """diffusers' own readers: the kohya file through its kohya converter, the diffusers file as it is; every
    text-encoder key names a module of the real encoder (without text_model. in the flattened CLIPTextModel)."""
    out, encoders = sdxl_with_text_encoders["out"], sdxl_with_text_encoders["encoders"]
    modules = {"text_encoder": dict(encoders["clip_l"].named_modules()),
               "text_encoder_2": dict(encoders["clip_g"].named_modules())}
    kohya = load_file(out / "subject_kohya.safetensors")
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(kohya, unet_config=sdxl_with_text_encoders["unet"].config)
    diffusers_file = load_file(out / "pytorch_lora_weights.safetensors")
    for state in (converted, diffusers_file):
        found = {"text_encoder": set(), "text_encoder_2": set()}
        for component in found:
            # what diffusers' _load_lora_into_text_encoder does with the keys under its prefix
            prefixed = {k.removeprefix(component + "."): v for k, v in state.items() if k.startswith(component + ".")}
            for key in convert_state_dict_to_peft(convert_state_dict_to_diffusers(prefixed)):
                module = key.split(".lora")[0]
                live = module if module in modules[component] else module.removeprefix("text_model.")
                assert live in modules[component], key
                found[component].add(live)
        assert (len(found["text_encoder"]), len(found["text_encoder_2"])) == (48, 128)
