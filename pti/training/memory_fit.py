"""Does a training step fit in memory without gradient checkpointing? Measured, not guessed.

One probe forward of the (LoRA-)UNet at a quarter of the training latent area counts the bytes autograd saves
for the backward pass (new tensors only: frozen weights it keeps a reference to cost nothing), scales that to the
training batch and size, and compares it with the memory still free on the device (CUDA: ``mem_get_info``;
CPU: the system's available memory).
"""

from __future__ import annotations

import torch

from pti.models.base_model import free_bytes

HEADROOM = 1.5  # backward temporaries, allocator fragmentation and the optimizer step on top of saved activations
GIB = 1024**3
# Bytes per trainable parameter beyond its float32 weight: the float32 gradient plus the optimizer's state
# (AdamW: two float32 moments; 8-bit AdamW: two 1-byte moments; Prodigy: four float32 buffers).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}
GRADIENT_BYTES = 4
FULL_WEIGHT_BYTES = 4  # trainable weights are kept in float32


def training_state_bytes(num_trainable: int, optimizer: str) -> int:
    """Bytes the gradients and optimizer state of ``num_trainable`` float32 parameters will take."""
    return num_trainable * (GRADIENT_BYTES + OPTIMIZER_STATE_BYTES.get(optimizer, OPTIMIZER_STATE_BYTES["adamw"]))


def full_finetune_bytes(num_params: int, current_weight_bytes: int, optimizer: str) -> int:
    """Extra bytes a full fine-tune needs beyond the loaded UNet: its weights upcast to float32, their gradients
    and the optimizer state (SDXL in bf16: 2.6 B params × (2 + 4 + 8) bytes ≈ 34 GiB with AdamW)."""
    upcast = num_params * max(0, FULL_WEIGHT_BYTES - current_weight_bytes)
    return upcast + training_state_bytes(num_params, optimizer)


def full_finetune_refusal(num_params: int, current_weight_bytes: int, optimizer: str, free: int,
                          is_cuda: bool) -> str | None:
    """None when a full fine-tune's weights, gradients and optimizer state fit in ``free`` bytes (with room for
    activations left); else one line naming what would fit."""
    needed = full_finetune_bytes(num_params, current_weight_bytes, optimizer)
    if needed * HEADROOM <= free:
        return None
    options = ["is_lora=true"]
    smaller = full_finetune_bytes(num_params, current_weight_bytes, "adamw8bit")
    if optimizer != "adamw8bit" and is_cuda and smaller * HEADROOM <= free:
        options.append(f"optimizer=adamw8bit (≈{smaller / GIB:.1f} GiB)")
    return (f"a full fine-tune (is_lora=false) with {optimizer} needs ≈{needed / GIB:.1f} GiB for the UNet's float32 "
            f"weights, gradients and optimizer state, but {free / GIB:.1f} GiB are free; use "
            + " or ".join(options))


def saved_activation_bytes(unet: torch.nn.Module, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                           added_cond: dict[str, torch.Tensor], autocast) -> int:
    """Bytes of the tensors one training forward saves for backward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    timesteps = torch.full((latents.shape[0],), 500, device=latents.device)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        unet(latents, timesteps, prompt_embeds, added_cond_kwargs=added_cond)
    return total


def needs_gradient_checkpointing(unet: torch.nn.Module, *, batch_size: int, latent_size: tuple[int, int],
                                 text_shape: tuple[int, int], pooled_dim: int, device: torch.device,
                                 autocast, reserved_bytes: int = 0) -> bool:
    """True when the estimated activations of a step at ``batch_size`` x ``latent_size`` do not fit in free memory
    less ``reserved_bytes`` (the gradients and optimizer state that do not exist yet when this is asked)."""
    height, width = latent_size
    probe_h, probe_w = max(8, height // 2 // 8 * 8), max(8, width // 2 // 8 * 8)
    dtype = next(unet.parameters()).dtype
    latents = torch.zeros(1, unet.config.in_channels, probe_h, probe_w, device=device)
    prompt_embeds = torch.zeros(1, *text_shape, device=device, dtype=dtype)
    added = {"text_embeds": torch.zeros(1, pooled_dim, device=device, dtype=dtype),
             "time_ids": torch.zeros(1, 6, device=device)}
    probe = saved_activation_bytes(unet, latents, prompt_embeds, added, autocast)
    estimate = probe * batch_size * (height * width) / (probe_h * probe_w)
    return estimate * HEADROOM > free_bytes(device) - reserved_bytes
