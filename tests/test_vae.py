"""Variational autoencoder: the KL term, the loss scaling, score shapes, and detection after a short fit."""

from __future__ import annotations

import math

import pytest
import torch

from uadct.errors import UadctError
from uadct.models import build_model
from uadct.models.vae import gaussian_kl_divergence

SCORES = {"mse", "l1", "kld", "mse_kld", "topk", "scalar"}


def smooth_patches(count: int, generator: torch.Generator, size: int = 16) -> torch.Tensor:
    """``(count, 1, size, size)`` low-frequency cosine mixtures around 0.5 (the "healthy" class)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    a = torch.rand(count, 4, 1, 1, generator=generator)
    image = 0.5 + 0.2 * (a[:, 0] - 0.5) + 0.15 * torch.cos(math.pi * (x * a[:, 1] + y * a[:, 2]) + 6 * a[:, 3])
    return image.unsqueeze(1)


def test_kld_matches_closed_form_and_torch_distributions():
    mean = torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 0.0]])
    log_variance = torch.tensor([[0.0, math.log(4.0), math.log(0.25)], [0.0, 0.0, 0.0]])
    # 0.5 * (mu^2 + var - 1 - log var) per unit
    expected_first = 0.5 * (1.0 + 0.0) + 0.5 * (4.0 - 1.0 - math.log(4.0)) + 0.5 * (4.0 + 0.25 - 1.0 - math.log(0.25))
    kld = gaussian_kl_divergence(mean, log_variance)
    torch.testing.assert_close(kld, torch.tensor([expected_first, 0.0]))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * log_variance).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(1)
    torch.testing.assert_close(kld, reference)


def test_eval_loss_is_masked_reconstruction_plus_beta_kld_per_voxel():
    torch.manual_seed(0)
    model = build_model("vae", {"patch_size": 16, "beta": 3.0}).eval()
    x = torch.rand(4, 1, 16, 16)
    mask = torch.zeros_like(x)
    mask[..., :8] = 1
    with torch.no_grad():
        losses = model.training_loss(x, mask)
        mean, log_variance = model.encode(x)
        voxels = mask.sum()
        reconstruction = ((x - model(x)) ** 2)[..., :8].sum() / voxels
        kld = gaussian_kl_divergence(mean, log_variance).sum() / voxels
    torch.testing.assert_close(losses["reconstruction"], reconstruction)
    torch.testing.assert_close(losses["kld"], kld)
    torch.testing.assert_close(losses["loss"], reconstruction + 3.0 * kld)


def test_training_samples_the_latent_but_scores_are_deterministic():
    torch.manual_seed(0)
    model = build_model("vae", {"patch_size": 16, "dropout": 0.0})
    x = torch.rand(4, 1, 16, 16)
    model.train()
    assert model.training_loss(x, torch.ones_like(x))["loss"] != model.training_loss(x, torch.ones_like(x))["loss"]
    model.eval()
    with torch.no_grad():
        first, second = model.score_patches(x), model.score_patches(x)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_score_shapes_selection_masking_and_topk_cap():
    torch.manual_seed(0)
    model = build_model("vae", {"patch_size": 8, "score": "topk", "top_k": 200}).eval()
    x = torch.rand(5, 1, 8, 8)
    mask = torch.zeros_like(x)
    mask[..., 2:6, 2:6] = 1
    with torch.no_grad():
        scores = model.score_patches(x)
        masked = model.score_patches(x, mask)
    assert set(scores) == SCORES | {"voxel"}
    assert model.outputs == ("voxel", "scalar")
    assert scores["voxel"].shape == (5, 8, 8)
    assert all(scores[key].shape == (5,) for key in SCORES)
    # k = 200 is capped at the 64 voxels of the patch: the top-k mean is the plain mean
    torch.testing.assert_close(scores["topk"], scores["voxel"].flatten(1).mean(1))
    torch.testing.assert_close(scores["scalar"], scores["topk"])
    torch.testing.assert_close(scores["mse_kld"], scores["mse"] + scores["kld"])
    assert not masked["voxel"][mask[:, 0] == 0].any()
    torch.testing.assert_close(masked["voxel"][mask[:, 0] > 0], scores["voxel"][mask[:, 0] > 0])


def test_unknown_score_is_refused_with_the_choices():
    with pytest.raises(UadctError, match="unknown score 'auc'.*mse_kld"):
        build_model("vae", {"score": "auc"})


@pytest.mark.slow


def test_dark_lesion_scores_higher_than_healthy_after_a_short_fit():
    """A dark square lowers |x| (an untrained network scores it *lower*); only a model that
    learned the healthy appearance restores it and scores it higher."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model("vae", {"patch_size": 16, "base_channels": 8})
    optimizers = model.configure_optimizers(3e-3)
    model.train()
    for _ in range(80):
        x = smooth_patches(64, generator)
        model.training_step(x, torch.ones_like(x), optimizers)
    model.eval()
    healthy = smooth_patches(64, generator)
    lesion = healthy.clone()
    lesion[..., 5:11, 5:11] -= 0.4
    with torch.no_grad():
        healthy_scores, lesion_scores = model.score_patches(healthy), model.score_patches(lesion)
    for key in ("mse", "l1", "topk", "mse_kld"):
        assert (lesion_scores[key] > healthy_scores[key]).float().mean() >= 0.9, key
    assert lesion_scores["mse"].mean() > 2 * healthy_scores["mse"].mean()
    inside = lesion_scores["voxel"][:, 5:11, 5:11].mean()
    outside = lesion_scores["voxel"][:, :4].mean()
    assert inside > 2 * outside
