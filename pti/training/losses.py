"""Noise and loss maths of diffusion training: masked MSE, min-SNR weights, offset and pyramid noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_SNR_PREDICTION_TYPES = ("epsilon", "v_prediction")


def masked_mse_per_sample(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample ``[B]``, each pixel weighted by ``mask`` ([B, 1, h, w], 0..1).

    The weighted sum is divided by the mask's total weight, so a small mask does not shrink the loss."""
    squared = (pred.float() - target.float()) ** 2
    if mask is None:
        return squared.mean(dim=(1, 2, 3))
    weights = mask.float().expand_as(squared)
    return (squared * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp_min(1e-8)


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at each timestep."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): ``min(snr, gamma) / snr`` for epsilon prediction,
    ``min(snr, gamma) / (snr + 1)`` for v-prediction."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"min-SNR weighting supports epsilon and v_prediction, not {prediction_type!r}")


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add a per-sample, per-channel constant (lets the model learn very dark/bright images)."""
    if strength == 0:
        return noise
    offset = torch.randn(noise.shape[0], noise.shape[1], 1, 1, generator=generator, device=noise.device)
    return noise + strength * offset.to(noise.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution noise: add upsampled noise drawn at 1/2, 1/4, … resolution, weighted ``discount**i``,
    then rescale to unit std per sample."""
    if iterations == 0:
        return noise
    batch, channels, height, width = noise.shape
    result = noise.clone()
    for i in range(1, iterations + 1):
        scale = 2**i
        h, w = max(1, height // scale), max(1, width // scale)
        low = torch.randn(batch, channels, h, w, generator=generator, device=noise.device).to(noise.dtype)
        result = result + F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False) * discount**i
        if h == 1 and w == 1:
            break
    return result / result.std(dim=(1, 2, 3), keepdim=True)
