"""BiGAN and alpha-GAN: every loss term against its definition, the score modes, save -> load."""

from __future__ import annotations

import pytest
import torch

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.errors import UadctError
from uadct.models import build_model

SMALL = {"patch_size": 16, "base_channels": 4, "latent_dim": 6, "code_hidden": 8}


def _trained(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, {**SMALL, **options})
    optimizers = model.configure_optimizers(1e-3)
    x = torch.rand(8, 1, 16, 16)
    model.train()
    for _ in range(2):
        model.training_step(x, torch.ones_like(x), optimizers)
    return model.eval()


def test_bigan_losses_match_their_definitions():
    model = _trained("bigan")
    x, z = torch.rand(4, 1, 16, 16), torch.randn(4, 6)
    with torch.no_grad():
        losses = model.adversarial_losses(x, z)
        real = model.discriminator(x, model.encoder(x))
        fake = model.discriminator(model.generator(z), z)
    torch.testing.assert_close(losses["discriminator"], torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    torch.testing.assert_close(losses["generator"], real.mean() - fake.mean())


def test_alphagan_losses_match_their_definitions():
    model = _trained("alphagan", reconstruction_weight=3.0)
    x, z = torch.rand(4, 1, 16, 16), torch.randn(4, 6)
    masks = torch.zeros_like(x)
    masks[..., 2:9, :] = 1
    with torch.no_grad():
        terms = model.losses(x, masks, z)
        code = model.encoder(x)
        rec, gen = model.generator(code), model.generator(z)
        d_real, d_rec, d_gen = (model.discriminator(v)[0] for v in (x, rec, gen))
        c_prior, c_code = model.code_discriminator(z), model.code_discriminator(code)
    l1 = (x - rec).abs()[..., 2:9, :].mean()
    hinge = lambda v: torch.clamp(v, min=0).mean()  # noqa: E731
    torch.testing.assert_close(terms["reconstruction"], l1)
    torch.testing.assert_close(terms["discriminator"], hinge(1 - d_real) + hinge(1 + d_rec) + hinge(1 + d_gen))
    torch.testing.assert_close(terms["code"], hinge(1 - c_prior) + hinge(1 + c_code))
    torch.testing.assert_close(terms["generator"], 3.0 * l1 - d_rec.mean() - d_gen.mean() - c_code.mean())


@pytest.mark.parametrize("name", ["bigan", "alphagan"])
def test_score_modes_follow_their_definitions(name):
    x = torch.rand(6, 1, 16, 16)
    x[:3] += torch.randn(3, 1, 16, 16)  # some patches far from anything seen
    by_mode = {}
    for mode in ("reconstruction", "discriminator", "combined"):
        model = _trained(name, score=mode, score_lambda=0.25)
        with torch.no_grad():
            by_mode[mode] = model.score_patches(x)
    scores = by_mode["combined"]
    model = _trained(name)
    with torch.no_grad():
        code = model.encoder(x)
        reconstruction = model.generator(code)
        if name == "bigan":
            discriminator = 1 - torch.sigmoid(model.discriminator(x, code))
        else:
            discriminator = 0.5 * ((1 - torch.sigmoid(model.discriminator(x)[0])) + (1 - torch.sigmoid(model.code_discriminator(code))))
    torch.testing.assert_close(scores["reconstruction"], (x - reconstruction).square().flatten(1).mean(1))
    torch.testing.assert_close(scores["discriminator"], discriminator)
    torch.testing.assert_close(scores["combined"], 0.75 * scores["reconstruction"] + 0.25 * scores["discriminator"])
    torch.testing.assert_close(scores["voxel"], (x - reconstruction).abs()[:, 0])
    for mode, result in by_mode.items():  # the same weights (same seed): only the chosen "scalar" differs
        torch.testing.assert_close(result["scalar"], scores[mode])
    assert not torch.allclose(by_mode["reconstruction"]["scalar"], by_mode["discriminator"]["scalar"])
    assert ((0 <= scores["discriminator"]) & (scores["discriminator"] <= 1)).all()


@pytest.mark.parametrize("name", ["bigan", "alphagan"])
def test_fit_save_load_gives_identical_scores(name, tmp_path):
    model = _trained(name, score="combined")
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        before = model.score_patches(x, torch.ones_like(x))
    save_checkpoint(tmp_path / "m.pt", model, {"patch": {"size": 16, "dims": 2}})
    loaded = load_checkpoint(tmp_path / "m.pt").model
    assert loaded.config.score == "combined"
    with torch.no_grad():
        after = loaded.score_patches(x, torch.ones_like(x))
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bigan", "alphagan"])
def test_training_step_updates_discriminators_at_their_own_rate_and_bad_options_fail(name):
    torch.manual_seed(0)
    model = build_model(name, SMALL).train()
    optimizers = model.configure_optimizers(1e-3)
    assert optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.005)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 1, 16, 16)
    result = model.training_step(x, torch.ones_like(x), optimizers)
    assert {"loss", "discriminator"} <= set(result)
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"encoder", "generator", "discriminator"} <= changed
    with pytest.raises(UadctError, match="unknown score"):
        build_model(name, {**SMALL, "score": "mse"})
    with pytest.raises(UadctError, match="score_lambda"):
        build_model(name, {**SMALL, "score_lambda": 2.0})
