"""The exported files against the key schemes and formulas of the tools people load them into, on the real SDXL-base
architecture (UNet and both text encoders built on the ``meta`` device: shapes and names without weights).

Each consumer's rule is written here from its own loading code (read, not copied):
* ComfyUI and Forge (``model_lora_keys_unet``): a kohya key ``lora_unet_<SGM path with _>`` patches the checkpoint
  weight ``diffusion_model.<SGM path>.weight``; Forge gives up on a LoRA with more than 12 keys it cannot match.
* A1111 (``networks.load_network``): the same SGM names (``lora_unet`` → ``diffusion_model``); a key whose part before
  the first dot is ``bundle_emb`` is split at the next dot into (embedding name, ``clip_l``/``clip_g``).
* kohya ``networks/sdxl_merge_lora.py``: every key without ``alpha`` names its module as the text before
  ``.lora_``, whose ``.alpha`` it then looks up.
* A1111/Forge textual inversion (``create_embedding_from_data``): a file with ``clip_l`` and ``clip_g`` is an SDXL
  embedding of ``clip_g.shape[0]`` vectors; ComfyUI reads ``clip_l``/``clip_g`` for each encoder.

InvokeAI ships on the package index, so its own code loads these files in tests/test_invokeai_loads_our_files.py.
* DoRA: PEFT scales each output row of ``W + s·BA`` to the magnitude; A1111 and ComfyUI divide per input column,
  and ComfyUI/Forge's ``[out, 1]`` branch divides by the base weight's row norm.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pti.formats import export
from pti.formats import lora_formats as lf
from pti.training.trainer import DEFAULT_LORA_TARGETS
from test_lora_formats import SDXL_UNET_CONFIG

RANK, ALPHA = 4, 8.0
TRIGGERS = {f"T{i}": f"<s{i}>" for i in range(7)}  # 7 trigger words: 14 bundled keys, over Forge's 12
FORGE_MAX_UNMATCHED = 12
SGM_PREFIX = "diffusion_model."
# The two SDXL-base text encoders (text_encoder/config.json and text_encoder_2/config.json of the base model).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, hidden_act="gelu")


def meta_sdxl_unet_with_training_lora() -> UNet2DConditionModel:
    """The SDXL-base UNet on ``meta`` with the LoRA attached the way the trainer attaches it."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                target_modules=list(DEFAULT_LORA_TARGETS)))
    return unet


def text_encoder_widths() -> dict[str, int]:
    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    return {"clip_l": clip_l.get_input_embeddings().weight.shape[1],
            "clip_g": clip_g.get_input_embeddings().weight.shape[1]}


def materialised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real CPU tensors of the meta adapter's shapes (the LoRA alone is a few MB)."""
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in state.items()}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    unet = meta_sdxl_unet_with_training_lora()
    state = materialised(get_peft_model_state_dict(unet))
    widths = text_encoder_widths()
    generator = torch.Generator().manual_seed(1)
    embeddings = {name: torch.randn(len(TRIGGERS), width, generator=generator) for name, width in widths.items()}
    out = tmp_path_factory.mktemp("sdxl") / "sdxl_lora"
    export.write_weight_files(out, unet_lora_state=state, lora_alpha=ALPHA, embeddings=embeddings,
                              special_params=TRIGGERS, training_config={}, name="subject",
                              unet_layout=lf.UNetLayout.from_unet_config(unet.config))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    return {"unet": unet, "out": out, "state": state, "modules": modules, "embeddings": embeddings, "widths": widths}


def checkpoint_weight_keys(unet: UNet2DConditionModel) -> set[str]:
    """The UNet weights of an original (SGM) SDXL checkpoint, without the ``model.`` prefix. Checked against
    diffusers' own single-file converter: it must turn exactly these keys into every diffusers UNet parameter."""
    plain = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    sgm = {}
    for key in plain:
        module, _, param = key.rpartition(".")
        sgm[f"model.{SGM_PREFIX}{lf.diffusers_module_to_sgm(module)}.{param}"] = torch.empty(0)
    assert set(convert_ldm_unet_checkpoint(sgm, dict(unet.config))) == set(plain)
    return {k.removeprefix("model.") for k in sgm if k.endswith(".weight")}


def comfyui_key_map(unet: UNet2DConditionModel) -> dict[str, str]:
    """ComfyUI's (and Forge's) kohya name → checkpoint weight, for every UNet weight."""
    return {"lora_unet_" + k[len(SGM_PREFIX):-len(".weight")].replace(".", "_"): k
            for k in checkpoint_weight_keys(unet)}


def layers_of(state: dict[str, torch.Tensor]) -> tuple[set[str], list[str]]:
    """(matched-looking LoRA layers, keys that are not LoRA tensors) the way ComfyUI/Forge walk a file."""
    layers, others = set(), []
    for key in state:
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if key.endswith(suffix):
                layers.add(key[: -len(suffix)])
                break
        else:
            others.append(key)
    return layers, others


def test_every_lora_module_patches_the_checkpoint_weight_comfyui_forge_and_a1111_name(sdxl):
    key_map = comfyui_key_map(sdxl["unet"])
    plain = load_file(sdxl["out"] / "subject_kohya.safetensors")
    layers, others = layers_of(plain)
    assert len(layers) == len(sdxl["modules"]) == 70 * 2 * 4  # SDXL: 70 transformer blocks × 2 attentions × q/k/v/out
    assert layers <= set(key_map) and not others
    assert {key_map[layer] for layer in layers} == {
        SGM_PREFIX + lf.diffusers_module_to_sgm(m) + ".weight" for m in sdxl["modules"]}
    # A1111 spells the same map with "diffusion_model" in place of "lora_unet"
    a1111 = {SGM_PREFIX.rstrip(".") + "_" + k[len(SGM_PREFIX):-len(".weight")].replace(".", "_")
             for k in checkpoint_weight_keys(sdxl["unet"])}
    assert {layer.replace("lora_unet", "diffusion_model", 1) for layer in layers} <= a1111


def test_alpha_and_rank_give_the_trained_scale(sdxl):
    with safe_open(sdxl["out"] / "subject_kohya.safetensors", "pt") as handle:
        metadata = handle.metadata()
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if key.endswith(".alpha"):
                assert tensor.dim() == 0 and tensor.dtype == torch.float32 and tensor.item() == ALPHA
            else:
                assert tensor.dtype == torch.float16  # the default save_precision
                assert RANK in tensor.shape
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(RANK), str(ALPHA))


def test_diffusers_reads_the_plain_file_onto_the_trained_modules(sdxl):
    plain = load_file(sdxl["out"] / "subject_kohya.safetensors")
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(plain, unet_config=sdxl["unet"].config)
    read_back = {k.removeprefix("unet.").replace(".processor.", ".").replace("_lora.down.weight", "")
                 .replace("to_out", "to_out.0") for k in converted if k.endswith("down.weight")}
    assert read_back == set(sdxl["modules"])


def test_forge_keeps_the_plain_file_whatever_the_number_of_triggers_not_the_bundle(sdxl):
    key_map = comfyui_key_map(sdxl["unet"])
    for name, expected_unmatched in (("subject_kohya", 0), ("subject", 2 * len(TRIGGERS))):
        layers, others = layers_of(load_file(sdxl["out"] / f"{name}.safetensors"))
        unmatched = len(others) + len(layers - set(key_map))
        assert unmatched == expected_unmatched, name
    assert 2 * len(TRIGGERS) > FORGE_MAX_UNMATCHED, "the bundle alone would make Forge drop the LoRA"


def kohya_merge_modules(files: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """sdxl_merge_lora.py's merge of LoRAs, as far as keys go: each non-alpha key's module and its alpha."""
    alphas: dict[str, float] = {}
    for state in files:
        for key, value in state.items():
            if "alpha" in key:
                alphas[key[: key.rfind(".alpha")]] = float(value)
            elif "lora_down" in key:
                alphas.setdefault(key[: key.rfind(".lora_down")], float(value.shape[0]))
        for key in state:
            if "alpha" not in key:
                alphas[key[: key.rfind(".lora_")]]  # KeyError, as in the script, for a key it cannot place
    return alphas


def test_kohya_merge_accepts_the_plain_file_and_fails_on_the_bundle(sdxl):
    plain = load_file(sdxl["out"] / "subject_kohya.safetensors")
    merged = kohya_merge_modules([plain, plain])
    assert len(merged) == len(sdxl["modules"]) and set(merged.values()) == {ALPHA}
    with pytest.raises(KeyError):
        kohya_merge_modules([load_file(sdxl["out"] / "subject.safetensors"), plain])


def a1111_bundled_embeddings(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    bundled: dict[str, dict[str, torch.Tensor]] = {}
    for key, weight in state.items():
        head, _, rest = key.partition(".")
        if head == "bundle_emb":
            name, vector = rest.split(".", 1)
            bundled.setdefault(name, {})[vector] = weight
    return bundled


def sdxl_embedding_shape(data: dict[str, torch.Tensor]) -> tuple[int, int]:
    """A1111/Forge ``create_embedding_from_data`` for an SDXL file: (vectors, width of clip_g + clip_l)."""
    return data["clip_g"].shape[0], data["clip_g"].shape[-1] + data["clip_l"].shape[-1]


def test_embeddings_per_trigger_and_bundled_have_each_encoders_width(sdxl):
    widths = sdxl["widths"]
    assert widths == {"clip_l": 768, "clip_g": 1280}
    bundled = a1111_bundled_embeddings(load_file(sdxl["out"] / "subject.safetensors"))
    assert set(bundled) == set(TRIGGERS)
    for row, trigger in enumerate(TRIGGERS):
        alone = load_file(sdxl["out"] / "embeddings" / f"{trigger}.safetensors")
        for data in (alone, bundled[trigger]):
            assert sdxl_embedding_shape(data) == (1, 768 + 1280)
            for encoder, width in widths.items():  # ComfyUI: embed[embed_key] for each encoder
                assert data[encoder].shape == (1, width)
                assert torch.equal(data[encoder], sdxl["embeddings"][encoder][row:row + 1].half())
    full = load_file(sdxl["out"] / "embeddings.safetensors")
    assert {k: tuple(v.shape) for k, v in full.items()} == {"clip_l": (7, 768), "clip_g": (7, 1280)}


# ---------------------------------------------------------------------------------------------- DoRA


def peft_dora_delta(layer) -> torch.Tensor:
    """The weight change a PEFT DoRA layer applies, measured through its forward pass on the identity."""
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        return (layer(eye) - layer.base_layer(eye)).T


def a1111_dora_delta(weight, down, up, alpha, dora_scale):
    """A1111 ``apply_weight_decompose`` then ``* calc_scale()``: per input column, the alpha scale outside."""
    merged = weight + up @ down
    norm = merged.norm(dim=0, keepdim=True)
    return (merged * (dora_scale / norm) - weight) * (alpha / down.shape[0])


def comfyui_dora_delta(weight, down, up, alpha, dora_scale):
    """ComfyUI/Forge ``weight_decompose`` at strength 1: an ``[out, 1]`` scale divides by the base weight's row
    norm, any other by the adapted weight's column norm."""
    calc = weight + (alpha / down.shape[0]) * (up @ down)
    if dora_scale.shape[0] == weight.shape[0]:
        norm = weight.norm(dim=1, keepdim=True)
    else:
        norm = calc.norm(dim=0, keepdim=True)
    return calc * (dora_scale / norm) - weight


def best_column_scaling_delta(weight, down, up, alpha, trained):
    """The closest any per-input-column decomposition (A1111, ComfyUI/Forge with a ``[1, in]`` scale, LyCORIS's
    default) can get: ``(W + s·BA)·diag(h)`` with each ``h`` fitted by least squares to the trained weight."""
    merged = weight + (alpha / down.shape[0]) * (up @ down)
    target = weight + trained
    h = (merged * target).sum(dim=0) / (merged * merged).sum(dim=0)
    return merged * h - weight


def relative_error(delta: torch.Tensor, reference: torch.Tensor) -> float:
    return float((delta - reference).norm() / reference.norm())


def test_no_consumer_of_the_kohya_layout_applies_a_peft_dora_so_none_is_written():
    """A PEFT DoRA layer the shape of a quarter of SDXL's attn2.to_k (2048 → 640), with trained-looking B and
    magnitude. PEFT's own formula written out reproduces it to float32 rounding; every consumer formula, with the
    magnitude as ``dora_scale [out, 1]``, and even the best per-input-column scale, is far off. Hence the exporter
    writes no kohya-layout file for a DoRA (tests/test_export.py checks that and the card)."""
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    out_features, in_features = 160, 512
    module = torch.nn.Sequential()
    module.add_module("to_k", torch.nn.Linear(in_features, out_features, bias=False))
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_k"], use_dora=True,
                                       init_lora_weights="gaussian"), module)
    layer = module.to_k
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.05)
        layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.2 * torch.rand(out_features))
    weight = layer.base_layer.weight.detach()
    down, up = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    magnitude = layer.lora_magnitude_vector["default"].weight.detach()
    trained = peft_dora_delta(layer)

    merged = weight + (ALPHA / RANK) * (up @ down)
    written_out = merged * (magnitude[:, None] / merged.norm(dim=1, keepdim=True)) - weight
    assert relative_error(written_out, trained) < 1e-4  # float32 rounding of 512-term sums

    errors = {"a1111": relative_error(a1111_dora_delta(weight, down, up, ALPHA, magnitude[:, None]), trained),
              "comfyui_forge": relative_error(comfyui_dora_delta(weight, down, up, ALPHA, magnitude[:, None]), trained),
              "best_per_column": relative_error(best_column_scaling_delta(weight, down, up, ALPHA, trained), trained)}
    assert all(error > 0.1 for error in errors.values()), errors
