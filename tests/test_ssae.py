"""Scale-space autoencoder: the Laplacian pyramid, the per-band loss and the recombined residual map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.errors import UadctError
from uadct.models import build_model
from uadct.models.ssae import _up, band_masks, collapse, laplacian_pyramid

SMALL = {"patch_size": 16, "base_channels": 4, "latent_dim": 6, "bands": 3}


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (2, 1, 8, 8, 8)])
def test_pyramid_bands_sum_back_to_the_input(shape):
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64)
    bands = laplacian_pyramid(x, 3)
    size = shape[-1]
    assert [b.shape[-1] for b in bands] == [size, size // 2, size // 4]
    torch.testing.assert_close(collapse(bands), x, rtol=0, atol=1e-12)
    full = []  # each band brought to full resolution (upsampling is linear): they simply add up to the input
    for k, band in enumerate(bands):
        for _ in range(k):
            band = _up(band)
        full.append(band)
    torch.testing.assert_close(sum(full), x, rtol=0, atol=1e-12)
    # the coarsest band is the 4x-averaged image; a detail band of a constant image is zero
    pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
    torch.testing.assert_close(bands[-1], pool(x, 4))
    flat = laplacian_pyramid(torch.full(shape, 0.7, dtype=torch.float64), 3)
    assert all(float(b.abs().max()) < 1e-12 for b in flat[:-1])


def test_loss_is_the_sum_of_masked_band_losses():
    torch.manual_seed(0)
    model = build_model("ssae", SMALL).eval()
    x = torch.rand(4, 1, 16, 16)
    masks = torch.zeros_like(x)
    masks[..., 3:11, 5:16] = 1
    with torch.no_grad():
        losses = model.training_loss(x, masks)
        bands = laplacian_pyramid(x, 3)
        expected = 0.0
        for k, band in enumerate(bands):
            estimate = model.band_models[k](band)
            mask = (F.max_pool2d(masks, 2**k) > 0).float() if k else masks
            band_loss = ((band - estimate) ** 2 * mask).sum() / mask.sum()
            torch.testing.assert_close(losses[f"band{k}"], band_loss)
            expected = expected + band_loss
    torch.testing.assert_close(losses["loss"], expected)
    assert [m.shape[-1] for m in band_masks(masks, 3)] == [16, 8, 4]


def test_voxel_map_is_the_recombined_residual_and_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("ssae", SMALL)
    optimizers = model.configure_optimizers(1e-3)
    x = torch.rand(8, 1, 16, 16)
    model.train()
    for _ in range(3):
        model.training_step(x, torch.ones_like(x), optimizers)
    model.eval()
    with torch.no_grad():
        scores = model.score_patches(x)
        reconstruction = model(x)
    torch.testing.assert_close(scores["voxel"], (x - reconstruction).abs()[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores["scalar"], (x - reconstruction).square().flatten(1).mean(1), rtol=1e-4, atol=1e-6)
    assert {"band0", "band1", "band2"} <= set(scores)
    save_checkpoint(tmp_path / "m.pt", model, {"patch": {"size": 16, "dims": 2}})
    with torch.no_grad():
        again = load_checkpoint(tmp_path / "m.pt").model.score_patches(x)
    for key in scores:
        torch.testing.assert_close(again[key], scores[key], rtol=0, atol=0)


def test_training_lowers_the_loss_and_bad_band_counts_are_refused():
    torch.manual_seed(0)
    model = build_model("ssae", SMALL)
    optimizers = model.configure_optimizers(3e-3)
    x = torch.rand(16, 1, 16, 16)
    model.train()
    first = model.training_step(x, torch.ones_like(x), optimizers)["loss"]
    for _ in range(30):
        last = model.training_step(x, torch.ones_like(x), optimizers)["loss"]
    assert last < first
    with pytest.raises(UadctError, match="divisible"):
        build_model("ssae", {"patch_size": 8, "bands": 4})
