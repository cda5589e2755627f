"""f-AnoGAN: gradient penalty by hand, the izi_f formula, the two training phases and early stopping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uadct.models import build_model
from uadct.models.fanogan import GAN_PHASE_VALIDATION, gradient_penalty

SMALL = {"patch_size": 16, "base_channels": 8, "latent_dim": 6}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_penalty_of_a_linear_critic_is_its_weight_norm():
    torch.manual_seed(0)
    critic = nn.Linear(6, 1)
    real, fake = torch.rand(5, 6), torch.rand(5, 6)
    penalty = gradient_penalty(lambda v: critic(v).squeeze(1), real, fake)
    norm = critic.weight.detach().norm()
    torch.testing.assert_close(penalty, (norm - 1) ** 2)
    penalty.backward()  # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    torch.testing.assert_close(critic.weight.grad, 2 * (norm - 1) * critic.weight.detach() / norm)


def test_gradient_penalty_of_a_quadratic_critic_by_hand():
    real, fake = torch.rand(3, 1, 2, 2), torch.rand(3, 1, 2, 2)
    mixing = torch.tensor([0.0, 0.25, 1.0])
    penalty = gradient_penalty(lambda v: (v**2).flatten(1).sum(1), real, fake, mixing)
    between = mixing.view(3, 1, 1, 1) * real + (1 - mixing.view(3, 1, 1, 1)) * fake
    gradient_norms = (2 * between).flatten(1).norm(dim=1)  # grad of sum(x^2) is 2x
    torch.testing.assert_close(penalty, ((gradient_norms - 1) ** 2).mean())


def test_izi_f_matches_its_formula():
    torch.manual_seed(0)
    model = build_model("fanogan", {**SMALL, "kappa": 0.5}).eval()
    x = torch.rand(4, 1, 16, 16)
    mask = torch.zeros_like(x)
    mask[..., 4:12, :] = 1
    with torch.no_grad():
        terms = model.izi_f(x)
        masked = model.izi_f(x, mask)
        scores = model.score_patches(x)
        loss = model.training_loss(x, torch.ones_like(x))["loss"]
        reconstruction = model.generator(model.encoder(x))
        features_x = model.critic.features(x).flatten(1)
        features_r = model.critic.features(reconstruction).flatten(1)
    n, n_d = 16 * 16, features_x.shape[1]
    residual = ((x - reconstruction) ** 2).flatten(1).sum(1) / n
    feature = ((features_x - features_r) ** 2).sum(1) / n_d
    expected = residual + 0.5 * feature
    torch.testing.assert_close(terms["score"], expected)
    torch.testing.assert_close(scores["scalar"], expected)
    torch.testing.assert_close(scores["voxel"], (x - reconstruction).abs()[:, 0])
    torch.testing.assert_close(loss, expected.mean())
    masked_residual = ((x - reconstruction) ** 2)[..., 4:12, :].flatten(1).mean(1)  # n = voxels in the mask
    torch.testing.assert_close(masked["score"], masked_residual + 0.5 * feature)


def test_generator_steps_once_per_n_critic_steps():
    torch.manual_seed(0)
    model = build_model("fanogan", {**SMALL, "n_critic": 3, "gan_steps": 10}).train()
    optimizers = model.configure_optimizers(1e-3)
    x = torch.rand(8, 1, 16, 16)
    generator_before = _parameters(model.generator)  # (its batch-norm statistics move whenever it makes fakes)
    critic_before = _parameters(model.critic)
    for _ in range(2):
        result = model.training_step(x, torch.ones_like(x), optimizers)
        assert "generator" not in result
    assert _same(generator_before, _parameters(model.generator))
    assert not _same(critic_before, _parameters(model.critic))
    result = model.training_step(x, torch.ones_like(x), optimizers)
    assert "generator" in result and {"loss", "wasserstein", "gradient_penalty"} <= set(result)
    assert not _same(generator_before, _parameters(model.generator))


@pytest.mark.slow


def test_encoder_phase_leaves_generator_and_critic_untouched():
    torch.manual_seed(0)
    model = build_model("fanogan", {**SMALL, "n_critic": 1, "gan_steps": 3})
    optimizers = model.configure_optimizers(1e-3)
    x = torch.rand(8, 1, 16, 16)
    generator_start, encoder_start = _state(model.generator), _state(model.encoder)
    model.train()
    for _ in range(3):
        model.training_step(x, torch.ones_like(x), optimizers)
    assert model.in_encoder_phase
    assert not _same(generator_start, _state(model.generator))  # the GAN did train
    assert _same(encoder_start, _state(model.encoder))  # ... and the encoder did not
    generator, critic = _state(model.generator), _state(model.critic)
    model.train()  # what the engine calls each epoch: G and D must stay in eval mode
    assert not model.generator.training and not model.critic.training and model.encoder.training
    for _ in range(3):
        losses = model.training_step(x, torch.ones_like(x), optimizers)
        assert set(losses) == {"loss", "residual", "feature"}
    assert _same(generator, _state(model.generator))  # parameters and batch-norm statistics
    assert _same(critic, _state(model.critic))
    assert not _same(encoder_start, _state(model.encoder))
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the step


@pytest.mark.slow


def test_validation_loss_keeps_early_stopping_sound_across_phases():
    torch.manual_seed(0)
    model = build_model("fanogan", {**SMALL, "n_critic": 1, "gan_steps": 4})
    optimizers = model.configure_optimizers(1e-3)
    x = torch.rand(8, 1, 16, 16)
    mask = torch.ones_like(x)
    values = []
    for _ in range(6):
        model.train()
        model.training_step(x, mask, optimizers)
        model.eval()
        with torch.no_grad():
            values.append(model.validation_loss(x, mask))
    gan, encoder = values[:3], values[3:]
    assert gan == [GAN_PHASE_VALIDATION + 3, GAN_PHASE_VALIDATION + 2, GAN_PHASE_VALIDATION + 1]  # strictly falling
    assert all(value < GAN_PHASE_VALIDATION / 1e6 for value in encoder)  # any izi_f beats the GAN phase
    with torch.no_grad():
        assert encoder[-1] == pytest.approx(float(model.training_loss(x, mask)["loss"]))


def test_paper_defaults():
    config = build_model("fanogan").config
    assert (config.n_critic, config.gradient_penalty_weight, config.kappa) == (5, 10.0, 1.0)
