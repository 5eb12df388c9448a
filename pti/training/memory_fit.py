"""Does a training step fit in memory without gradient checkpointing? Measured, not guessed.

One probe forward of the (LoRA-)UNet at a quarter of the training latent area counts the bytes autograd saves
for the backward pass (new tensors only: frozen weights it keeps a reference to cost nothing), scales that to the
training batch and size, and compares it with the memory still free on the device (CUDA: ``mem_get_info``;
CPU: the system's available memory).
"""

from __future__ import annotations

import psutil
import torch

HEADROOM = 1.5  # backward temporaries, allocator fragmentation and the optimizer step on top of saved activations


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


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
                                 autocast) -> bool:
    """True when the estimated activations of a step at ``batch_size`` x ``latent_size`` do not fit in free memory."""
    height, width = latent_size
    probe_h, probe_w = max(8, height // 2 // 8 * 8), max(8, width // 2 // 8 * 8)
    dtype = next(unet.parameters()).dtype
    latents = torch.zeros(1, unet.config.in_channels, probe_h, probe_w, device=device)
    prompt_embeds = torch.zeros(1, *text_shape, device=device, dtype=dtype)
    added = {"text_embeds": torch.zeros(1, pooled_dim, device=device, dtype=dtype),
             "time_ids": torch.zeros(1, 6, device=device)}
    probe = saved_activation_bytes(unet, latents, prompt_embeds, added, autocast)
    estimate = probe * batch_size * (height * width) / (probe_h * probe_w)
    return estimate * HEADROOM > free_bytes(device)
