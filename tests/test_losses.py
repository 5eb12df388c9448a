"""Loss and noise maths: masked MSE, min-SNR weights, offset and pyramid noise."""

import pytest
import torch
import torch.nn.functional as F

from pti.training.losses import compute_snr, masked_mse_per_sample, min_snr_weights, offset_noise, pyramid_noise


def test_masked_mse_without_mask_is_plain_mse_per_sample():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    expected = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    assert torch.allclose(masked_mse_per_sample(pred, target), expected)
    assert torch.allclose(masked_mse_per_sample(pred, target, torch.ones(3, 1, 8, 8)), expected)


def test_masked_mse_ignores_errors_where_the_mask_is_zero():
    target = torch.zeros(1, 4, 8, 8)
    pred = target.clone()
    pred[..., :, 4:] = 10.0  # large error only in the right half
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0
    assert masked_mse_per_sample(pred, target, mask).item() == 0.0
    assert masked_mse_per_sample(pred, target, 1 - mask).item() == pytest.approx(100.0)


def test_masked_mse_is_normalised_by_mask_weight():
    pred, target = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    small = torch.zeros(1, 1, 8, 8)
    small[..., 0, 0] = 0.5
    assert masked_mse_per_sample(pred, target, small).item() == pytest.approx(1.0)


def test_snr_falls_with_timestep():
    alphas_cumprod = torch.linspace(0.999, 0.001, 1000)
    snr = compute_snr(alphas_cumprod, torch.tensor([0, 500, 999]))
    assert snr[0] > snr[1] > snr[2]
    assert snr[1].item() == pytest.approx(alphas_cumprod[500].item() / (1 - alphas_cumprod[500].item()), rel=1e-5)


def test_min_snr_weights_epsilon_and_v_prediction():
    snr = torch.tensor([0.5, 5.0, 50.0])
    eps = min_snr_weights(snr, 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 0.1]))
    v = min_snr_weights(snr, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0]))
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(snr, 5.0, "sample")


def test_offset_noise_shifts_whole_channels():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 4, 16, 16, generator=generator)
    shifted = offset_noise(noise, 0.5, generator)
    channel_shift = (shifted - noise).flatten(2)
    per_channel_constant = channel_shift[..., :1].expand_as(channel_shift)
    assert torch.allclose(channel_shift, per_channel_constant, atol=1e-6)
    assert channel_shift[..., 0].std().item() == pytest.approx(0.5, rel=0.2)
    assert offset_noise(noise, 0.0) is noise


def test_pyramid_noise_has_unit_std_and_more_low_frequency_energy():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 4, 32, 32, generator=generator)
    pyramid = pyramid_noise(noise, iterations=4, discount=0.8, generator=generator)
    assert pyramid.std(dim=(1, 2, 3)).allclose(torch.ones(8), atol=1e-5)
    # 4x4 block means keep much more of their variance when low-frequency noise was added
    blocks = lambda x: F.avg_pool2d(x, 4).var().item()  # noqa: E731
    assert blocks(pyramid) > 3 * blocks(noise)
    assert pyramid_noise(noise, 0, 0.8) is noise
