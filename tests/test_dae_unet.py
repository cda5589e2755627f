"""Large-patch denoising U-Net (Kascenas et al.): coarse noise inside the mask, the masked L2 loss, the map, a short fit."""

from __future__ import annotations

import math

import pytest
import torch

from uadct.errors import UadctError
from uadct.models import build_model
from uadct.models.dae import coarse_noise


def smooth_patches(count: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    a = torch.rand(count, 4, 1, 1, generator=generator)
    image = 0.5 + 0.2 * (a[:, 0] - 0.5) + 0.15 * torch.cos(math.pi * (x * a[:, 1] + y * a[:, 2]) + 6 * a[:, 3])
    return image.unsqueeze(1)


def test_noise_is_coarse_masked_and_of_the_configured_strength():
    model = build_model("dae-unet", {"patch_size": 32, "noise_cell": 8, "noise_std": 0.2})
    x = torch.rand(500, 1, 32, 32)
    mask = torch.zeros_like(x)
    mask[..., 4:28, 2:20] = 1
    noise = model.corrupt(x, mask, torch.Generator().manual_seed(0)) - x
    assert not noise[mask == 0].any()
    assert abs(float(noise[mask > 0].std()) - 0.2) < 0.01
    expected = coarse_noise((500, 1, 32, 32), 32 // 8, 0.2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise, expected * mask)  # the lattice is patch / noise_cell = 4 cells per side
    neighbours = float(torch.corrcoef(torch.stack([noise[:, 0, 10, 8], noise[:, 0, 10, 9]]))[0, 1])
    assert neighbours > 0.9  # smooth: one lattice cell spans 8 voxels


def test_loss_is_the_masked_mean_squared_restoration_error():
    torch.manual_seed(0)
    model = build_model("dae-unet", {"patch_size": 16, "base_channels": 4, "levels": 2}).eval()
    x = torch.rand(4, 1, 16, 16)
    mask = torch.zeros_like(x)
    mask[..., 3:12, 1:9] = 1
    loss = model.training_loss(x, mask, generator=torch.Generator().manual_seed(3))["loss"]
    noisy = model.corrupt(x, mask, torch.Generator().manual_seed(3))
    with torch.no_grad():
        manual = (model(noisy) - x)[mask > 0].square().mean()
    torch.testing.assert_close(loss, manual)


def test_map_is_the_restoration_error_of_the_clean_input():
    torch.manual_seed(0)
    model = build_model("dae-unet", {"patch_size": 16, "base_channels": 4}).eval()
    x = torch.rand(3, 1, 16, 16)
    mask = torch.ones_like(x)
    mask[..., :5, :] = 0
    with torch.no_grad():
        scores = model.score_patches(x, mask)
        torch.testing.assert_close(scores["voxel"], ((x - model(x)).abs() * mask)[:, 0])
        assert model.validation_loss(x, mask) == model.validation_loss(x, mask)
    torch.testing.assert_close(scores["scalar"], scores["voxel"].flatten(1).mean(1))


@pytest.mark.parametrize("options, message", [({"noise_cell": 3}, "noise_cell = 3"), ({"patch_size": 12}, "2\\*\\*levels = 8"),
                                              ({"levels": 0}, "at least 1")])
def test_bad_settings_are_one_line_errors(options, message):
    with pytest.raises(UadctError, match=message):
        build_model("dae-unet", {"patch_size": 16, **options})


@pytest.mark.slow


def test_short_fit_restores_noise_and_flags_a_bright_lesion():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model("dae-unet", {"patch_size": 32, "base_channels": 8, "levels": 2, "noise_cell": 8})
    optimizers = model.configure_optimizers(3e-3)
    model.train()
    for _ in range(60):
        x = smooth_patches(32, generator)
        model.training_step(x, torch.ones_like(x), optimizers)
    model.eval()
    healthy = smooth_patches(32, generator)
    noisy = model.corrupt(healthy, torch.ones_like(healthy), torch.Generator().manual_seed(5))
    lesion = healthy.clone()
    lesion[..., 12:20, 12:20] += 0.4
    with torch.no_grad():
        restored = model(noisy)
        lesion_map = model.score_patches(lesion)["voxel"]
    # the noise is 0.2 per voxel; the restoration is closer to the clean patch (untrained: identity, ratio 1)
    assert float((restored - healthy).square().mean().sqrt()) < 0.7 * float((noisy - healthy).square().mean().sqrt())
    assert lesion_map[:, 13:19, 13:19].mean() > 2 * lesion_map[:, :8].mean()
