"""Synthetic-anomaly segmentation: the blended anomalies (shape, content, target), the loss terms, a short fit."""

from __future__ import annotations

import math

import pytest
import torch

from uadct.errors import UadctError
from uadct.models import build_model
from uadct.models.synthetic_anomaly import SyntheticAnomalyConfig, anomaly_shapes, blend_synthetic_anomalies


def smooth_patches(count: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """``(count, 1, size, size)`` low-frequency cosine mixtures around 0.5 (the "healthy" class)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    a = torch.rand(count, 4, 1, 1, generator=generator)
    image = 0.5 + 0.2 * (a[:, 0] - 0.5) + 0.15 * torch.cos(math.pi * (x * a[:, 1] + y * a[:, 2]) + 6 * a[:, 3])
    return image.unsqueeze(1)


def _box_mask(count: int, size: int = 32) -> torch.Tensor:
    mask = torch.zeros(count, 1, size, size)
    mask[..., 4:28, 8:30] = 1
    return mask


@pytest.mark.parametrize(
    "options, content",
    [
        ({"kinds": ("constant",), "constant_range": (0.7, 0.7), "texture": 0.0}, lambda x: torch.full_like(x, 0.7)),
        ({"kinds": ("foreign",)}, lambda x: x.roll(1, dims=0)),
    ],
)
def test_anomaly_is_the_content_blended_by_the_target(options, content):
    config = SyntheticAnomalyConfig(patch_size=32, clean_fraction=0.0, **options)
    x = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = _box_mask(64)
    corrupted, target = blend_synthetic_anomalies(x, mask, config, torch.Generator().manual_seed(1))
    assert corrupted.shape == target.shape == x.shape
    torch.testing.assert_close(corrupted, x + target * (content(x) - x))
    assert float(target.min()) >= 0 and float(target.max()) <= 1
    assert not target[mask == 0].any()  # anomalies stay inside the brain mask
    assert (target.flatten(1).amax(1) > 0.1).all()  # clean_fraction 0: every patch has one


def test_intensity_shifts_are_hyper_and_hypo_within_range():
    config = SyntheticAnomalyConfig(patch_size=32, clean_fraction=0.0, kinds=("shift",), shift_range=(0.5, 0.5), texture=0.0)
    x = torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    corrupted, target = blend_synthetic_anomalies(x, _box_mask(200), config, torch.Generator().manual_seed(2))
    inside = target > 0.05
    ratio = (corrupted - x)[inside] / target[inside]
    torch.testing.assert_close(ratio.abs(), torch.full_like(ratio, 0.5), rtol=1e-4, atol=1e-4)
    per_patch = ((corrupted - x) * inside).flatten(1).sum(1)
    hyper = float((per_patch > 0).float().mean())
    assert 0.35 < hyper < 0.65


def test_clean_fraction_leaves_that_share_of_patches_untouched():
    config = SyntheticAnomalyConfig(patch_size=32, clean_fraction=0.5)
    x = torch.rand(400, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    corrupted, target = blend_synthetic_anomalies(x, _box_mask(400), config, torch.Generator().manual_seed(3))
    clean = target.flatten(1).amax(1) == 0
    assert 0.42 < float(clean.float().mean()) < 0.58
    assert torch.equal(corrupted[clean], x[clean])


def test_shapes_are_centred_in_the_mask_and_scale_with_the_radius():
    mask = torch.zeros(300, 1, 32, 32)
    mask[..., 10:20, 12:22] = 1
    small = anomaly_shapes(mask, SyntheticAnomalyConfig(patch_size=32, radius_range=(2.0, 2.0)), torch.Generator().manual_seed(0))
    large = anomaly_shapes(mask, SyntheticAnomalyConfig(patch_size=32, radius_range=(6.0, 6.0)), torch.Generator().manual_seed(0))
    peak = small.flatten(1).argmax(1)
    assert mask.flatten(1)[torch.arange(300), peak].all()  # the centre is a mask voxel
    assert float(small.amax((1, 2, 3)).min()) > 0.9  # soft edges, but full strength at the centre
    area_small, area_large = float((small > 0.5).sum((1, 2, 3)).float().mean()), float((large > 0.5).sum((1, 2, 3)).float().mean())
    # an ellipse of radius r covers pi r^2 on average (the warp and elongation are symmetric in log-space)
    assert 0.5 * math.pi * 4 < area_small < 2 * math.pi * 4
    assert 5 < area_large / area_small < 13  # (6/2)^2 = 9


def test_shapes_work_in_3d():
    mask = torch.ones(8, 1, 16, 16, 16)
    shapes = anomaly_shapes(mask, SyntheticAnomalyConfig(patch_size=16, dims=3, radius_range=(3.0, 3.0)), torch.Generator().manual_seed(0))
    assert shapes.shape == mask.shape
    volume = float((shapes > 0.5).sum((1, 2, 3, 4)).float().mean())
    assert 0.4 * 4 / 3 * math.pi * 27 < volume < 2.5 * 4 / 3 * math.pi * 27


@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_loss_is_masked_bce_plus_weighted_soft_dice_of_the_blend_factor(dice_weight):
    torch.manual_seed(0)
    model = build_model("synthetic-anomaly", {"patch_size": 16, "base_channels": 4, "dice_weight": dice_weight}).eval()
    x = torch.rand(6, 1, 16, 16)
    mask = torch.zeros_like(x)
    mask[..., 2:14, 3:15] = 1
    losses = model.training_loss(x, mask, generator=torch.Generator().manual_seed(7))
    corrupted, target = blend_synthetic_anomalies(x, mask, model.config, torch.Generator().manual_seed(7))
    with torch.no_grad():
        probability = torch.sigmoid(model(corrupted))
    inside = mask > 0
    p, t = probability[inside], target[inside]
    bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    torch.testing.assert_close(losses["bce"], bce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["loss"], bce + dice_weight * dice, rtol=1e-4, atol=1e-5)
    assert ("dice" in losses) == (dice_weight > 0)


def test_scores_are_masked_probabilities_and_validation_is_deterministic():
    torch.manual_seed(0)
    model = build_model("synthetic-anomaly", {"patch_size": 16, "base_channels": 4}).eval()
    x = torch.rand(5, 1, 16, 16)
    mask = torch.ones_like(x)
    mask[..., :4] = 0
    with torch.no_grad():
        scores = model.score_patches(x, mask)
        torch.testing.assert_close(scores["voxel"], (torch.sigmoid(model(x)) * mask)[:, 0])
        rng = torch.get_rng_state()
        assert model.validation_loss(x, mask) == model.validation_loss(x, mask)
        assert torch.equal(rng, torch.get_rng_state())
    assert float(scores["voxel"].min()) >= 0 and float(scores["voxel"].max()) <= 1
    assert not scores["voxel"][..., :4].any()
    torch.testing.assert_close(scores["scalar"], scores["voxel"].flatten(1).mean(1))


@pytest.mark.parametrize(
    "options, message",
    [({"patch_size": 20, "levels": 3}, "2\\*\\*levels = 8"), ({"kinds": ("cutout",)}, "kinds must be some of"),
     ({"radius_range": (0.0, 3.0)}, "radius_range"), ({"clean_fraction": 1.0}, "clean_fraction")],
)
def test_bad_settings_are_one_line_errors(options, message):
    with pytest.raises(UadctError, match=message):
        build_model("synthetic-anomaly", {"patch_size": 16, **options})


@pytest.mark.slow


def test_short_fit_segments_an_unseen_dark_lesion():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model("synthetic-anomaly", {"patch_size": 32, "base_channels": 8, "levels": 2, "radius_range": (2.0, 6.0)})
    optimizers = model.configure_optimizers(3e-3)
    model.train()
    for _ in range(80):
        x = smooth_patches(32, generator)
        model.training_step(x, torch.ones_like(x), optimizers)
    model.eval()
    healthy = smooth_patches(32, generator)
    lesion = healthy.clone()
    lesion[..., 12:20, 12:20] -= 0.4
    with torch.no_grad():
        healthy_map = model.score_patches(healthy)["voxel"]
        lesion_map = model.score_patches(lesion)["voxel"]
    inside = lesion_map[:, 13:19, 13:19].mean()
    assert inside > 0.5
    assert inside > 5 * healthy_map.mean()
    assert lesion_map[:, :8].mean() < 0.2  # far from the lesion the map stays low
