"""f-AnoGAN (Schlegl et al. 2019): a WGAN-GP, then an izi_f encoder with the GAN frozen.

Networks (DCGAN pyramids shared with :mod:`uadct.models.ganomaly`): generator ``G``
``z (B, L) -> (B, C, *patch)`` with batch norm and a linear output; critic ``D`` without
batch norm (the gradient penalty is per sample) that also returns its last hidden
layer ``f(.)``; encoder ``E`` ``(B, C, *patch) -> (B, L)``. The latent prior is N(0, I).

Two phases inside the engine's single loop, told apart by the ``gan_steps_done``
buffer (so they survive checkpoints and the engine's best-epoch reload):

1. GAN phase, the first ``gan_steps`` calls of :meth:`training_step` (one batch
   each): one critic update per call (``E_fake D - E_real D + lambda GP``, lambda 10)
   and one generator update every ``n_critic`` calls (5: the critic sees ``n_critic``
   real batches per generator step, as in WGAN-GP).
2. Encoder phase: ``G`` and ``D`` frozen (no optimiser steps, eval mode, no parameter
   gradients); ``E`` minimises izi_f ``||x - G(E(x))||^2 / n + kappa ||f(x) -
   f(G(E(x)))||^2 / n_d`` (``n`` voxels inside the brain mask, ``n_d`` features).

Early stopping: the engine keeps the epoch with the lowest :meth:`validation_loss`
and stops after ``patience`` epochs without improvement. In the encoder phase the
validation loss is the izi_f loss of the current encoder. In the GAN phase it is
``GAN_PHASE_VALIDATION + steps left in the GAN phase``: a number far above any izi_f
loss that falls every epoch, so (i) every GAN epoch counts as an improvement and the
GAN phase can never trigger early stopping, (ii) the first encoder-phase epoch always
beats it, so the kept "best" weights always hold a trained encoder, and (iii) the
patience counts encoder-phase epochs only. Size ``max_epochs`` so that
``max_epochs * patches_per_epoch / batch_size`` exceeds ``gan_steps`` (a warning is
logged when training ends inside the GAN phase).

Score: izi_f per patch; voxel map ``|x - G(E(x))|``.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from uadct.errors import UadctError
from uadct.models.base import AnomalyModel, ModelConfig
from uadct.models.ganomaly import Discriminator, LatentEncoder, PatchDecoder, dcgan_init, frozen, gradient_penalty

log = logging.getLogger(__name__)

GAN_PHASE_VALIDATION = 1e12  # validation loss reported during the GAN phase, plus the steps left

__all__ = ["FAnoGAN", "FAnoGANConfig", "gradient_penalty", "GAN_PHASE_VALIDATION"]


@dataclasses.dataclass
class FAnoGANConfig(ModelConfig):
    """f-AnoGAN hyper-parameters (WGAN-GP: n_critic 5, lambda 10, Adam betas (0, 0.9); izi_f kappa 1)."""

    latent_dim: int = 128  # size of z (prior N(0, I))
    base_channels: int = 64  # channels of the first pyramid level, doubled per level
    gan_steps: int = 2000  # training_step calls (batches) spent on the WGAN-GP before the encoder phase
    n_critic: int = 5  # critic updates per generator update
    gradient_penalty_weight: float = 10.0  # lambda of the WGAN-GP penalty
    kappa: float = 1.0  # weight of the critic-feature term in izi_f
    adam_beta1: float = 0.0  # Adam beta1 of all optimisers
    adam_beta2: float = 0.9  # Adam beta2 of all optimisers


class FAnoGAN(AnomalyModel):
    name = "fanogan"
    summary = "f-AnoGAN (WGAN-GP + izi_f encoder); score = izi_f loss, voxel map = |x - G(E(x))|"
    outputs = ("scalar", "voxel")
    Config = FAnoGANConfig

    def __init__(self, config: FAnoGANConfig) -> None:
        super().__init__(config)
        if config.gan_steps < 0 or config.n_critic < 1:
            raise UadctError(f"fanogan: need gan_steps >= 0 and n_critic >= 1, got gan_steps={config.gan_steps}, n_critic={config.n_critic}")
        dims, channels, base, size, latent = config.dims, config.in_channels, config.base_channels, config.patch_size, config.latent_dim
        self.generator = PatchDecoder(dims, channels, base, size, latent)
        self.critic = Discriminator(dims, channels, base, size, batch_norm=False)
        self.encoder = LatentEncoder(dims, channels, base, size, latent)
        self.apply(dcgan_init)
        self.register_buffer("gan_steps_done", torch.zeros((), dtype=torch.long))

    @property
    def in_encoder_phase(self) -> bool:
        return int(self.gan_steps_done) >= self.config.gan_steps

    def train(self, mode: bool = True) -> "FAnoGAN":
        """As ``nn.Module.train``, but in the encoder phase ``G`` and ``D`` stay in eval mode."""
        super().train(mode)
        if self.in_encoder_phase:
            self.generator.eval()
            self.critic.eval()
        return self

    def sample_latent(self, count: int, like: torch.Tensor) -> torch.Tensor:
        """``(count, L)`` draws from the N(0, I) prior."""
        return torch.randn(count, self.config.latent_dim, device=like.device, dtype=like.dtype)

    def izi_f(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per patch ``(B,)``: ``residual`` mean squared ``x - G(E(x))`` (inside the mask),
        ``feature`` mean squared ``f(x) - f(G(E(x)))``, ``score = residual + kappa * feature``;
        and ``reconstruction`` ``(B, C, *patch)``."""
        reconstruction = self.generator(self.encoder(x))
        squared = (x - reconstruction).square().flatten(1)
        if masks is None:
            residual = squared.mean(1)
        else:
            flat_masks = masks.flatten(1)
            residual = (squared * flat_masks).sum(1) / flat_masks.sum(1).clamp_min(1.0)
        feature = (self.critic(x)[1] - self.critic(reconstruction)[1]).square().mean(1)
        return {"residual": residual, "feature": feature, "score": residual + self.config.kappa * feature, "reconstruction": reconstruction}

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The izi_f encoder's code ``E(x)`` ``(B, L)`` (forest scorer features)."""
        return self.encoder(patches)

    def critic_loss(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss = mean D(fake) - mean D(real) + lambda * GP``; ``wasserstein`` = the distance estimate."""
        wasserstein = self.critic(real)[0].mean() - self.critic(fake)[0].mean()
        penalty = gradient_penalty(lambda v: self.critic(v)[0], real, fake)
        return {"loss": -wasserstein + self.config.gradient_penalty_weight * penalty, "wasserstein": wasserstein, "gradient_penalty": penalty}

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The encoder-phase (izi_f) loss, averaged over the batch."""
        terms = self.izi_f(patches, masks)
        return {"loss": terms["score"].mean(), "residual": terms["residual"].mean(), "feature": terms["feature"].mean()}

    def configure_optimizers(self, learning_rate: float) -> dict[str, torch.optim.Optimizer]:
        betas = (self.config.adam_beta1, self.config.adam_beta2)
        return {
            name: torch.optim.Adam(getattr(self, name).parameters(), lr=learning_rate, betas=betas)
            for name in ("generator", "critic", "encoder")
        }

    def training_step(
        self, patches: torch.Tensor, masks: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer],
        positions: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """A GAN-phase step (critic, plus generator every ``n_critic``) or an encoder-phase step.

        Returns ``loss`` (the critic loss in the GAN phase, izi_f in the encoder phase) and its parts.
        """
        if self.in_encoder_phase:
            return self._encoder_step(patches, masks, optimizers["encoder"])
        return self._gan_step(patches, optimizers)

    def _gan_step(self, real: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        with torch.no_grad():
            fake = self.generator(self.sample_latent(len(real), real))
        critic = self.critic_loss(real, fake)
        optimizers["critic"].zero_grad(set_to_none=True)
        critic["loss"].backward()
        optimizers["critic"].step()
        result = {"loss": float(critic["loss"].detach()), "wasserstein": float(critic["wasserstein"].detach()),
                  "gradient_penalty": float(critic["gradient_penalty"].detach())}
        if int(self.gan_steps_done) % self.config.n_critic == self.config.n_critic - 1:
            with frozen(self.critic):
                generator_loss = -self.critic(self.generator(self.sample_latent(len(real), real)))[0].mean()
            optimizers["generator"].zero_grad(set_to_none=True)
            generator_loss.backward()
            optimizers["generator"].step()
            result["generator"] = float(generator_loss.detach())
        self.gan_steps_done += 1
        if self.in_encoder_phase:  # switch: G and D to eval mode from now on
            self.train(self.training)
        return result

    def _encoder_step(self, patches: torch.Tensor, masks: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        self.generator.eval()
        self.critic.eval()
        with frozen(self.generator, self.critic):
            losses = self.training_loss(patches, masks)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def validation_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        """izi_f of the current encoder; in the GAN phase ``GAN_PHASE_VALIDATION + steps left`` (module docstring)."""
        if not self.in_encoder_phase:
            return GAN_PHASE_VALIDATION + float(self.config.gan_steps - int(self.gan_steps_done))
        return float(self.training_loss(patches, masks)["loss"])

    def fit_statistics(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Nothing to fit (the izi_f score is used as is); warns when the encoder was never trained."""
        if not self.in_encoder_phase:
            log.warning(
                "f-AnoGAN training ended in its GAN phase (%d of %d GAN steps): the encoder is untrained; "
                "raise max_epochs or lower gan_steps", int(self.gan_steps_done), self.config.gan_steps,
            )

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``scalar`` (B,) izi_f, ``voxel`` (B, *patch) |x - G(E(x))|, ``residual``/``feature`` (B,) its terms."""
        terms = self.izi_f(patches, masks)
        voxel = (patches - terms["reconstruction"]).abs()
        if masks is not None:
            voxel = voxel * masks
        return {"scalar": terms["score"], "voxel": voxel[:, 0], "residual": terms["residual"], "feature": terms["feature"]}
