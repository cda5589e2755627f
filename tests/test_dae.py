"""Denoising autoencoder: the coarse noise (smooth, masked, right strength), shapes, and a short fit."""

from __future__ import annotations

import math

import pytest
import torch

from uadct.errors import UadctError
from uadct.models import build_model
from uadct.models.dae import coarse_noise


def smooth_patches(count: int, generator: torch.Generator, size: int = 16) -> torch.Tensor:
    """``(count, 1, size, size)`` low-frequency cosine mixtures around 0.5 (the "healthy" class)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    a = torch.rand(count, 4, 1, 1, generator=generator)
    image = 0.5 + 0.2 * (a[:, 0] - 0.5) + 0.15 * torch.cos(math.pi * (x * a[:, 1] + y * a[:, 2]) + 6 * a[:, 3])
    return image.unsqueeze(1)


def high_frequency_fraction(noise: torch.Tensor) -> float:
    """Share of the spectral power above half the Nyquist frequency (radially), ``(B, 1, H, W)``.

    A Hann window keeps the jump between opposite patch edges (the FFT wraps around)
    from leaking into the high frequencies.
    """
    window = torch.hann_window(noise.shape[-2], periodic=False)[:, None] * torch.hann_window(noise.shape[-1], periodic=False)
    power = torch.fft.fft2((noise - noise.mean((-2, -1), keepdim=True)) * window).abs().square().sum((0, 1))
    fy = torch.fft.fftfreq(noise.shape[-2]).abs()[:, None]
    fx = torch.fft.fftfreq(noise.shape[-1]).abs()[None, :]
    high = (fy.square() + fx.square()).sqrt() > 0.25
    return float(power[high].sum() / power.sum())


def test_coarse_noise_is_smooth_compared_with_white_noise():
    generator = torch.Generator().manual_seed(0)
    coarse = coarse_noise((256, 1, 16, 16), grid=4, std=0.2, generator=generator)
    white = 0.2 * torch.randn(256, 1, 16, 16, generator=generator)
    white_fraction = high_frequency_fraction(white)
    assert white_fraction > 0.7  # ~80% of the plane lies beyond radius 0.25
    assert high_frequency_fraction(coarse) < 0.05 * white_fraction


@pytest.mark.parametrize("shape,grid", [((4000, 1, 16, 16), 4), ((4000, 1, 16, 16), 2), ((600, 1, 8, 8, 8), 2)])
def test_coarse_noise_has_the_configured_std_at_every_voxel(shape, grid):
    noise = coarse_noise(shape, grid=grid, std=0.2, generator=torch.Generator().manual_seed(1))
    assert noise.shape == shape
    assert abs(float(noise.mean())) < 0.01
    assert abs(float(noise.std()) - 0.2) < 0.006
    per_voxel = noise.std(0)
    tolerance = 0.2 * 4 / math.sqrt(2 * shape[0])  # ~4 standard errors of a sample std
    assert float((per_voxel - 0.2).abs().max()) < tolerance


def test_noise_is_added_only_inside_the_mask_and_differs_per_patch():
    torch.manual_seed(0)
    model = build_model("dae", {"patch_size": 16, "noise_std": 0.2})
    x = torch.rand(8, 1, 16, 16)
    mask = torch.zeros_like(x)
    mask[..., 3:13, 2:9] = 1
    noise = model.corrupt(x, mask) - x
    assert not noise[mask == 0].any()
    assert (noise[mask > 0].abs() > 0).all()
    assert not torch.allclose(noise[0], noise[1])


def test_noise_grid_must_divide_the_patch():
    with pytest.raises(UadctError, match="noise_downsample = 3"):
        build_model("dae", {"patch_size": 16, "noise_downsample": 3})
    with pytest.raises(UadctError, match="2\\*\\*levels = 8"):
        build_model("dae", {"patch_size": 12, "levels": 3})


def test_scores_and_validation_loss_are_deterministic():
    torch.manual_seed(0)
    model = build_model("dae", {"patch_size": 16}).eval()
    x = torch.rand(6, 1, 16, 16)
    mask = torch.ones_like(x)
    with torch.no_grad():
        scores = model.score_patches(x)
        assert model.validation_loss(x, mask) == model.validation_loss(x, mask)
        rng_state = torch.get_rng_state()
        model.validation_loss(x, mask)
        assert torch.equal(rng_state, torch.get_rng_state())  # fixed noise, global stream untouched
    assert model.outputs == ("voxel", "scalar")
    assert scores["voxel"].shape == (6, 16, 16) and scores["scalar"].shape == (6,)
    with torch.no_grad():
        torch.testing.assert_close(scores["voxel"], (x - model(x)).abs()[:, 0])
    torch.testing.assert_close(scores["scalar"], scores["voxel"].flatten(1).mean(1))


@pytest.mark.slow


def test_short_fit_removes_coarse_noise_and_flags_a_dark_lesion():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model("dae", {"patch_size": 16, "base_channels": 8})
    optimizers = model.configure_optimizers(3e-3)
    model.train()
    for _ in range(60):
        x = smooth_patches(64, generator)
        model.training_step(x, torch.ones_like(x), optimizers)
    model.eval()
    healthy = smooth_patches(64, generator)
    noisy = model.corrupt(healthy, torch.ones_like(healthy), torch.Generator().manual_seed(5))
    lesion = healthy.clone()
    lesion[..., 5:11, 5:11] -= 0.4
    with torch.no_grad():
        restored = model(noisy)
        healthy_scores, lesion_scores = model.score_patches(healthy), model.score_patches(lesion)
    # the noise is 0.2 per voxel; the restoration is closer to the clean patch (untrained: 3x farther)
    assert float((restored - healthy).square().mean().sqrt()) < 0.7 * float((noisy - healthy).square().mean().sqrt())
    assert (lesion_scores["scalar"] > healthy_scores["scalar"]).float().mean() >= 0.9
    assert lesion_scores["voxel"][:, 5:11, 5:11].mean() > 2 * lesion_scores["voxel"][:, :4].mean()
