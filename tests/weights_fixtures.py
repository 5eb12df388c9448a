"""Trained-weights fixtures for the predictor tests: tars in this project's layout (written by export.py) and in
replicate/cog-sdxl's layout, built on the tiny model (the HTTP server they are served from is tests/misbehaving_server.py)."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pti.formats import export
from threads import TORCH_THREADS
from pti.formats.lora_formats import UNetLayout

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two cores shared by many processes: one torch thread per process is far faster than oversubscribing (a
    64x64 tiny image: 0.2 s instead of 6-12 s under load), and the fresh-process references use the same count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(previous)


TINY_TEXT_WIDTHS = {"clip_l": 32, "clip_g": 64}
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_unet():
    from diffusers import UNet2DConditionModel

    from pti.models.tiny_models import ensure_tiny_sdxl

    return UNet2DConditionModel.from_pretrained(ensure_tiny_sdxl(), subfolder="unet")


def random_peft_lora(unet, seed: int, rank: int = 4, alpha: float = 4.0) -> dict[str, torch.Tensor]:
    """A real PEFT LoRA on the tiny UNet's attention projections, with random (non-zero) lora_A and lora_B."""
    from peft import LoraConfig, get_peft_model_state_dict

    generator = torch.Generator().manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ATTENTION_PROJECTIONS)),
                     adapter_name=f"fixture{seed}")
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if f".fixture{seed}." in name and ("lora_A" in name or "lora_B" in name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    state = get_peft_model_state_dict(unet, adapter_name=f"fixture{seed}")
    unet.delete_adapters(f"fixture{seed}")
    return {k: v.clone() for k, v in state.items()}


def random_embeddings(seed: int, n_tokens: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1000)
    return {k: torch.randn(n_tokens, width, generator=generator) for k, width in TINY_TEXT_WIDTHS.items()}


def write_trained_tar(folder: Path, seed: int, unet=None, trigger: str = "TOK", zero_lora: bool = False) -> Path:
    """``folder/trained_model.tar`` as train() writes it (export.write_weight_files + pack_tar); ``zero_lora``: the
    LoRA's up weights are zero, so only the embeddings change anything."""
    unet = unet or tiny_unet()
    lora = random_peft_lora(unet, seed)
    if zero_lora:
        lora = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in lora.items()}
    out = folder / f"out{seed}{'-zero' if zero_lora else ''}"
    export.write_weight_files(
        out, unet_lora_state=lora, lora_alpha=4.0, embeddings=random_embeddings(seed),
        special_params={trigger: "<s0><s1>"}, training_config={"seed": seed},
        unet_layout=UNetLayout.from_unet_config(unet.config),
    )
    return export.pack_tar(out, folder / f"trained_model_{seed}{'-zero' if zero_lora else ''}.tar")


COG_SDXL_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}


def cog_sdxl_lora_by_hand(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A PEFT attention LoRA written the way replicate/cog-sdxl's trainer writes ``lora.safetensors``, built from its
    key names and not from our converters: ``unet_attn_processors_state_dict`` over ``LoRAAttnProcessor2_0``, so
    ``<attention>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight``. Its LoRALinearLayer has no alpha
    (scale 1), so ``alpha / rank`` has to be multiplied into ``up``."""
    out = {}
    for key, value in peft_state.items():
        match = re.fullmatch(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight", key)
        assert match, key
        attention, projection, which = match.groups()
        prefix = f"{attention}.processor.{COG_SDXL_PROJECTIONS[projection]}_lora"
        if which == "A":
            out[prefix + ".down.weight"] = value
        else:
            out[prefix + ".up.weight"] = value * (alpha / value.shape[1])
    return out


def write_cog_sdxl_tar(folder: Path, seed: int, unet=None) -> Path:
    """A tar in replicate/cog-sdxl's layout: ``lora.safetensors`` with LoRAAttnProcessor keys (``<attention>.processor.
    to_q_lora.down.weight``; rank from ``up``), ``embeddings.pti`` (``text_encoders_0/1``), ``special_params.json``."""
    unet = unet or tiny_unet()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not re.search(r"\.attn[12]$", name):
            continue
        for projection in ATTENTION_PROJECTIONS:
            layer = module.get_submodule(projection)
            key = f"{name}.processor.{projection.removesuffix('.0')}_lora"
            tensors[f"{key}.down.weight"] = torch.randn(4, layer.in_features, generator=generator) * 0.3
            tensors[f"{key}.up.weight"] = torch.randn(layer.out_features, 4, generator=generator) * 0.3
    out = folder / f"cog{seed}"
    out.mkdir(parents=True)
    save_file(tensors, out / "lora.safetensors")
    embeddings = random_embeddings(seed)
    save_file({"text_encoders_0": embeddings["clip_l"], "text_encoders_1": embeddings["clip_g"]}, out / "embeddings.pti")
    (out / "special_params.json").write_text(json.dumps({"TOK": "<s0><s1>"}))
    tar_path = folder / f"cog_sdxl_{seed}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for path in sorted(out.iterdir()):
            tar.add(path, arcname=path.name)
    return tar_path


def predictor_with_own_cache(tmp_path_factory):
    """Body of a module-scoped ``predictor`` fixture: a set-up ``Predictor`` whose weights cache is a fresh folder
    (``WEIGHTS_CACHE_DIR`` restored afterwards), so no other test module's downloads are reused."""
    import os

    from predict import Predictor

    previous = os.environ.get("WEIGHTS_CACHE_DIR")
    os.environ["WEIGHTS_CACHE_DIR"] = str(tmp_path_factory.mktemp("weights-cache"))
    predictor = Predictor()
    predictor.setup()
    yield predictor
    if previous is None:
        os.environ.pop("WEIGHTS_CACHE_DIR")
    else:
        os.environ["WEIGHTS_CACHE_DIR"] = previous
