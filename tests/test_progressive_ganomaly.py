"""Progressive GANomaly: loss terms and the WGAN-GP penalty against their definitions, continuity
of the fade-in, growth driven by the engine's early stopping, and exact save/load/resume."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.errors import UadctError
from uadct.models import build_model
from uadct.models.ganomaly import gradient_penalty
from uadct.models.progressive_ganomaly import FADE_IN_VALIDATION
from uadct.training import TrainConfig, resume_path, train_model

SMALL = {"patch_size": 16, "base_channels": 4, "latent_dim": 5, "fade_patches": 32}


def _model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("progressive-ganomaly", {**SMALL, **options})


def test_stages_and_resolutions():
    assert _model().stages == 2 and _model(patch_size=32).stages == 3 and _model(patch_size=32, start_size=16).stages == 2
    model = _model(patch_size=32)
    seen = [model.resolution]
    while model.advance_stage():
        assert model.alpha == 0.0  # a new stage starts with the old path only
        seen.append(model.resolution)
    assert seen == [8, 16, 32] and not model.advance_stage()


@pytest.mark.parametrize("options", [{"start_size": 4}, {"start_size": 12}, {"start_size": 32}, {"fade_patches": -1}, {"patch_size": 24}])
def test_bad_settings_are_refused(options):
    with pytest.raises(UadctError):
        _model(**options)


def test_generator_loss_terms_match_their_definitions_at_the_first_stage():
    model = _model(weight_adversarial=2.0, weight_contextual=3.0, weight_encoder=5.0).eval()
    x = torch.rand(4, 1, 16, 16)
    mask = torch.zeros_like(x)
    mask[..., 2:10, 4:14] = 1
    with torch.no_grad():
        losses = model.training_loss(x, mask)
        small, small_mask = F.avg_pool2d(x, 2), F.avg_pool2d(mask, 2)  # stage 0 works on 8x8
        z = model.encoder(small, model.level, 1.0)
        x_hat = model.decoder(z, model.level, 1.0)
        z_hat = model.second_encoder(x_hat, model.level, 1.0)
        f_real = model.discriminator(small, model.level, 1.0)[1]
        f_fake = model.discriminator(x_hat, model.level, 1.0)[1]
    assert x_hat.shape == (4, 1, 8, 8) and z.shape == (4, 5)
    adv = (f_real - f_fake).square().mean()
    con = ((small - x_hat).abs() * small_mask).sum() / small_mask.sum()  # fractional mask weights after pooling
    enc = (z - z_hat).square().mean()
    torch.testing.assert_close(losses["adv"], adv)
    torch.testing.assert_close(losses["con"], con)
    torch.testing.assert_close(losses["enc"], enc)
    torch.testing.assert_close(losses["loss"], 2 * adv + 3 * con + 5 * enc)


def test_gradient_penalty_matches_per_sample_autograd():
    model = _model()
    model.advance_stage()
    model.stage_patches.fill_(8)  # mid fade-in: alpha 0.25, both paths active
    critic = lambda v: model.discriminate(v)[0]  # noqa: E731
    real, fake = torch.rand(5, 1, 16, 16), torch.rand(5, 1, 16, 16)
    mixing = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    expected = []
    for i in range(5):  # one sample at a time: the critic has no batch norm, so samples are independent
        point = (mixing[i] * real[i : i + 1] + (1 - mixing[i]) * fake[i : i + 1]).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(point).sum(), point)
        expected.append((grad.flatten().norm() - 1) ** 2)
    torch.testing.assert_close(gradient_penalty(critic, real, fake, mixing), torch.stack(expected).mean())
    # and the critic loss uses it with lambda: E[D(fake)] - E[D(real)] + lambda * GP (same random mixing)
    torch.manual_seed(7)
    loss = model.discriminator_loss(real, fake)
    torch.manual_seed(7)
    drawn = torch.rand(5)
    manual = critic(fake).mean() - critic(real).mean() + 10.0 * gradient_penalty(critic, real, fake, drawn)
    torch.testing.assert_close(loss, manual)


def test_growing_is_continuous_at_alpha_zero():
    """Right after the jump (alpha 0) the grown model computes exactly what the smaller one did."""
    model = _model().eval()
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        before = model.score_patches(x)
        model.advance_stage()
        after = model.score_patches(x)
    assert model.resolution == 16 and model.alpha == 0.0
    for key in ("raw", "voxel"):
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow


def test_alpha_ramps_with_training_patches_and_is_saved(tmp_path):
    model = _model()
    optimizers = model.configure_optimizers(1e-3)
    model.advance_stage()
    x = torch.rand(8, 1, 16, 16)
    alphas = []
    for _ in range(5):
        alphas.append(model.training_step(x, torch.ones_like(x), optimizers)["alpha"])
    assert alphas == [0.25, 0.5, 0.75, 1.0, 1.0]  # fade_patches 32, batches of 8
    # mid-fade state survives a checkpoint: same stage, same alpha, same scores
    model.stage_patches.fill_(12)
    model.eval()
    with torch.no_grad():
        model.fit_statistics(torch.rand(32, 1, 16, 16), torch.ones(32, 1, 16, 16))
        before = model.score_patches(x)
        assert model.validation_loss(x, torch.ones_like(x)) == FADE_IN_VALIDATION + 20
    save_checkpoint(tmp_path / "m.pt", model, {"patch": {"size": 16, "dims": 2}})
    loaded = load_checkpoint(tmp_path / "m.pt").model
    assert (int(loaded.stage), loaded.alpha) == (1, 0.375)
    with torch.no_grad():
        after = loaded.score_patches(x)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------- with the engine
# learning rate 0: the weights stay put, so the validation loss stops improving at once and
# early stopping (patience 1) drives the growth deterministically; only batch-norm statistics move.
ENGINE = dict(model="progressive-ganomaly", patch_size=16, batch_size=8, patches_per_epoch=16, validation_patches=16,
              statistics_patches=32, learning_rate=0.0, max_epochs=5, patience=1, device="cpu",
              model_options={"base_channels": 4, "latent_dim": 4, "fade_patches": 16})


@pytest.fixture(scope="module")
def prep(atlas_grid_subjects, tmp_path_factory):
    return atlas_grid_subjects(tmp_path_factory.mktemp("progressive"), ["sub-00", "sub-01", "sub-02"])[1]


@pytest.mark.slow


def test_early_stopping_grows_to_the_patch_size_and_resume_continues_in_the_stage(prep, tmp_path):
    whole = train_model(prep, tmp_path / "whole.pt", TrainConfig(**ENGINE))
    advanced = [r["epoch"] for r in whole.history if r.get("stage_advanced")]
    assert len(advanced) == 1  # 8x8 -> 16x16 once; at 16x16 early stopping ends training
    assert whole.best_epoch > advanced[0]  # only the last stage's best epoch is kept
    model = load_checkpoint(whole.checkpoint).model
    assert (model.resolution, model.alpha, int(model.stage)) == (16, 1.0, 1)
    assert float(model.score_mad.min()) > 0  # statistics fitted at the final resolution

    def crash_in_second_stage(event, info):
        if event == "epoch" and info["epoch"] == advanced[0] + 1:
            raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        train_model(prep, tmp_path / "split.pt", TrainConfig(**ENGINE), progress=crash_in_second_stage)
    assert resume_path(tmp_path / "split.pt").is_file()
    resumed = train_model(prep, tmp_path / "split.pt", TrainConfig(**ENGINE), resume=True)
    assert [r["validation_loss"] for r in resumed.history] == [r["validation_loss"] for r in whole.history]
    whole_state, resumed_state = load_checkpoint(whole.checkpoint).model.state_dict(), load_checkpoint(resumed.checkpoint).model.state_dict()
    for key in whole_state:
        assert torch.equal(whole_state[key], resumed_state[key]), key
