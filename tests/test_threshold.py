"""Intensity threshold: maps against a numpy reference, fitted statistics in the checkpoint, no-op training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.errors import UadctError
from uadct.models import build_model
from uadct.models.base import median_and_mad


def _training_sample(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Skewed intensities, with bright values outside the mask that must not count."""
    images = rng.gamma(2.0, 0.2, size=(50, 1, 8, 8)).astype(np.float32)
    masks = (rng.random(images.shape) < 0.7).astype(np.float32)
    images[masks == 0] += 5.0
    return torch.from_numpy(images), torch.from_numpy(masks)


def test_median_matches_numpy_for_odd_and_even_counts(rng):
    for count in (1, 2, 7, 10):
        values = rng.normal(size=count).astype(np.float32)
        assert float(median_and_mad(torch.from_numpy(values)[:, None])[0][0]) == pytest.approx(float(np.median(values)), abs=1e-7)


@pytest.mark.parametrize("mode", ["deviation", "upper"])
def test_maps_match_a_numpy_reference(mode, rng):
    images, masks = _training_sample(rng)
    model = build_model("threshold", {"patch_size": 8, "mode": mode}).eval()
    with torch.no_grad():
        model.fit_statistics(images, masks)
    brain = images.numpy()[masks.numpy() > 0]
    centre = np.median(brain)
    mad = np.median(np.abs(brain - centre))
    assert float(model.median) == pytest.approx(centre, rel=1e-6)
    assert float(model.mad) == pytest.approx(mad, rel=1e-6)
    test = rng.gamma(2.0, 0.3, size=(6, 1, 8, 8)).astype(np.float32)
    deviation = (test - centre) / mad
    expected = np.abs(deviation) if mode == "deviation" else np.maximum(deviation, 0.0)
    with torch.no_grad():
        voxel = model.score_patches(torch.from_numpy(test))["voxel"].numpy()
    assert voxel.shape == (6, 8, 8)
    np.testing.assert_allclose(voxel, expected[:, 0], rtol=1e-5, atol=1e-5)
    if mode == "upper":
        assert (voxel[test[:, 0] < centre] == 0).all()


def test_intensity_mode_is_the_image_masked_and_needs_no_fit(rng):
    model = build_model("threshold", {"patch_size": 8}).eval()
    x = torch.from_numpy(rng.random((3, 1, 8, 8)).astype(np.float32))
    mask = torch.zeros_like(x)
    mask[..., :4] = 1
    assert model.outputs == ("voxel",)
    torch.testing.assert_close(model.score_patches(x)["voxel"], x[:, 0])
    torch.testing.assert_close(model.score_patches(x, mask)["voxel"], (x * mask)[:, 0])


def test_deviation_before_fitting_is_refused_and_unknown_mode_lists_choices():
    model = build_model("threshold", {"patch_size": 8, "mode": "deviation"})
    with pytest.raises(UadctError, match="not fitted"):
        model.score_patches(torch.rand(2, 1, 8, 8))
    with pytest.raises(UadctError, match="unknown mode 'lower'.*intensity, deviation, upper"):
        build_model("threshold", {"mode": "lower"})


def test_training_hooks_are_no_ops_and_statistics_survive_the_checkpoint(rng, tmp_path):
    images, masks = _training_sample(rng)
    model = build_model("threshold", {"patch_size": 8, "mode": "deviation"})
    assert list(model.parameters()) == []
    assert model.configure_optimizers(1e-3) == {}
    assert model.training_step(images, masks, {}) == {"loss": 0.0}
    assert model.validation_loss(images, masks) == 0.0
    with torch.no_grad():
        model.fit_statistics(images, masks)
    save_checkpoint(tmp_path / "t.pt", model, {"patch": {"size": 8, "dims": 2}})
    loaded = load_checkpoint(tmp_path / "t.pt").model
    assert bool(loaded.fitted)
    torch.testing.assert_close(loaded.median, model.median, rtol=0, atol=0)
    torch.testing.assert_close(loaded.mad, model.mad, rtol=0, atol=0)
