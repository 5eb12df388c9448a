"""Single-file SDXL checkpoints in the SGM layout (Stability's generative-models; what A1111, Forge, ComfyUI and
civitai use): one safetensors file holding the UNet (``model.diffusion_model.``), the VAE (``first_stage_model.``),
CLIP ViT-L (``conditioner.embedders.0.transformer.``) and OpenCLIP bigG (``conditioner.embedders.1.model.``).

:func:`sgm_state` writes diffusers state dicts as such a file's tensors; diffusers' single-file loader
(``StableDiffusionXLPipeline.from_single_file``) reads them back (tests/test_sgm_checkpoint.py checks the round
trip at the tiny and the real SDXL architecture). :func:`sgm_unet_state` reads the UNet part of such a file back
into diffusers names for the predictor. Pure key maps: no model is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
FULL_CHECKPOINT_FILE = "sdxl_checkpoint.safetensors"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"

UNET_DIRECT = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
               ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
OPENCLIP_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                  ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))


class SgmFormatError(ValueError):
    """Weights that do not map onto the SGM layout (or a file that is not one), one line."""


@dataclass(frozen=True)
class SdxlShape:
    """What the key maps need of the architecture: the UNet's and the VAE's block structure."""

    unet_layers_per_block: int
    unet_up_blocks_with_attention: tuple[bool, ...]
    vae_blocks: int

    @classmethod
    def from_configs(cls, unet_config, vae_config) -> SdxlShape:
        return cls(int(unet_config["layers_per_block"]),
                   tuple(kind.startswith("CrossAttn") for kind in unet_config["up_block_types"]),
                   len(vae_config["down_block_types"]))


# ---------------------------------------------------------------------------------------------- diffusers → SGM


def _replace_prefix(key: str, pairs) -> str | None:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _rename_in(rest: str, pairs) -> str:
    renamed = _replace_prefix(rest, pairs)
    return rest if renamed is None else renamed


def unet_key(key: str, shape: SdxlShape) -> str:
    """The SGM name (without ``model.diffusion_model.``) of a diffusers UNet key."""
    direct = _replace_prefix(key, UNET_DIRECT.items())
    if direct is not None:
        return direct
    per_block = shape.unet_layers_per_block + 1
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = per_block * block + layer + 1
        return (f"input_blocks.{index}.0.{_rename_in(rest, UNET_RESNET)}" if kind == "resnets"
                else f"input_blocks.{index}.1.{rest}")
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per_block * (int(match[1]) + 1)}.0.op.{match[2]}"
    if match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename_in(match[2], UNET_RESNET)}"
    if match := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = per_block * block + layer
        return (f"output_blocks.{index}.0.{_rename_in(rest, UNET_RESNET)}" if kind == "resnets"
                else f"output_blocks.{index}.1.{rest}")
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(match[1])
        slot = 2 if shape.unet_up_blocks_with_attention[block] else 1
        return f"output_blocks.{per_block * block + shape.unet_layers_per_block}.{slot}.conv.{match[2]}"
    raise SgmFormatError(f"UNet key {key!r} has no place in the SGM layout")


def vae_key(key: str, shape: SdxlShape) -> str:
    """The SGM name (without ``first_stage_model.``) of a diffusers VAE key."""
    key = key.replace("conv_norm_out.", "norm_out.")
    if match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{match[1]}.mid.attn_1.{_rename_in(match[2], VAE_ATTENTION)}"
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{match[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        block = shape.vae_blocks - 1 - int(match[1])
        return f"decoder.up.{block}.block.{match[2]}.{match[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{shape.vae_blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.|(post_)?quant_conv\.", key):
        return key
    raise SgmFormatError(f"VAE key {key!r} has no place in the SGM layout")


def _vae_tensor(sgm_key: str, value: Tensor) -> Tensor:
    """The SGM VAE's attention projections are 1x1 convolutions, diffusers' are linear layers."""
    if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", sgm_key) and value.dim() == 2:
        return value[:, :, None, None]
    return value


def clip_l_state(state: dict[str, Tensor], vocab_rows: int) -> dict[str, Tensor]:
    """CLIP ViT-L under ``conditioner.embedders.0.transformer.text_model.``; the token table cut to the base
    vocabulary (new-token rows live in the embeddings file)."""
    out = {}
    for key, value in state.items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        if name.endswith("embeddings.token_embedding.weight"):
            value = value[:vocab_rows]
        if name.endswith("position_ids"):
            continue
        out[CLIP_L_PREFIX + name] = value
    return out


def clip_g_state(state: dict[str, Tensor], vocab_rows: int) -> dict[str, Tensor]:
    """OpenCLIP bigG under ``conditioner.embedders.1.model.``: fused q/k/v ``in_proj`` weights, the projection
    transposed, the token table cut to the base vocabulary."""
    out = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix("text_model.")
        if name.endswith("position_ids"):
            continue
        if name == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value[:vocab_rows]
        elif name == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif name.startswith("final_layer_norm."):
            out["ln_final." + name.removeprefix("final_layer_norm.")] = value
        elif name == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif match := re.match(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", name):
            fused.setdefault(f"transformer.resblocks.{match[1]}.attn.in_proj_{match[3]}", {})[match[2]] = value
        elif match := re.match(r"encoder\.layers\.(\d+)\.(.*)", name):
            renamed = _replace_prefix(match[2], OPENCLIP_LAYER)
            if renamed is None:
                raise SgmFormatError(f"text_encoder_2 key {key!r} has no place in the SGM layout")
            out[f"transformer.resblocks.{match[1]}.{renamed}"] = value
        else:
            raise SgmFormatError(f"text_encoder_2 key {key!r} has no place in the SGM layout")
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {CLIP_G_PREFIX + k: v for k, v in out.items()}


def sgm_tensors(*, unet: dict[str, Tensor], vae: dict[str, Tensor], text_encoder: dict[str, Tensor],
                text_encoder_2: dict[str, Tensor], shape: SdxlShape, vocab_rows: tuple[int, int]) -> dict[str, Tensor]:
    """The tensors of a single-file SDXL checkpoint from diffusers state dicts, renamed (and fused/transposed where
    the layouts differ) but not cast or moved. ``vocab_rows``: each text encoder's base vocabulary size."""
    out = {UNET_PREFIX + unet_key(k, shape): v for k, v in unet.items()}
    for key, value in vae.items():
        name = vae_key(key, shape)
        out[VAE_PREFIX + name] = _vae_tensor(name, value)
    out.update(clip_l_state(text_encoder, vocab_rows[0]))
    out.update(clip_g_state(text_encoder_2, vocab_rows[1]))
    return out


def sgm_state(*, dtype: torch.dtype = torch.float16, **components) -> dict[str, Tensor]:
    """:func:`sgm_tensors` on the CPU in ``dtype`` (fp16 by default: half the bytes, what A1111/ComfyUI load),
    ready to save."""
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in sgm_tensors(**components).items()}


def checkpoint_metadata(name: str, triggers: list[str]) -> dict[str, str]:
    """``modelspec.*`` metadata (read by ComfyUI and model hubs) of a full fine-tune's checkpoint."""
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": MODELSPEC_ARCHITECTURE,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": name, "modelspec.trigger_phrase": ", ".join(triggers)}


# ---------------------------------------------------------------------------------------------- SGM → diffusers


def unet_layers_per_block(sgm_unet_keys: list[str]) -> int:
    """``layers_per_block`` of an SGM UNet, read from where its first downsampler sits
    (``input_blocks.<layers_per_block + 1>.0.op``); with no downsampler, all input blocks but the stem are layers."""
    down = sorted(int(m[1]) for k in sgm_unet_keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k)))
    if down:
        return down[0] - 1
    blocks = {int(m[1]) for k in sgm_unet_keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    if not blocks:
        raise SgmFormatError("the file holds no SDXL UNet (no model.diffusion_model.input_blocks keys)")
    return max(blocks)


def sgm_unet_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The UNet of an SGM checkpoint's tensors (``model.diffusion_model.*``) in diffusers names, by diffusers' own
    single-file converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = {k: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    if not unet:
        raise SgmFormatError("the file holds no SDXL UNet (no model.diffusion_model. keys)")
    config = {"layers_per_block": unet_layers_per_block([k[len(UNET_PREFIX):] for k in unet]),
              "addition_embed_type": "text_time"}
    return convert_ldm_unet_checkpoint(unet, config)
