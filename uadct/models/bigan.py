"""BiGAN / ALI (Donahue et al. 2017; Dumoulin et al. 2017) with the chest X-ray paper's scores.

Networks (DCGAN pyramids shared with :mod:`uadct.models.ganomaly`): generator ``G``
``z (B, L) -> (B, C, *patch)``, encoder ``E`` ``(B, C, *patch) -> (B, L)``, and a joint
discriminator ``D(x, z)`` (:class:`JointDiscriminator`: an image branch, a code branch and
a combination layer, as in the paper's appendix) that tells real pairs ``(x, E(x))`` from
generated pairs ``(G(z), z)``, ``z ~ N(0, I)``. Hinge adversarial loss (the paper's):

- discriminator: ``L_D = mean relu(1 - D(x, E(x))) + mean relu(1 + D(G(z), z))``;
- generator and encoder (one optimiser): ``L_EG = mean D(x, E(x)) - mean D(G(z), z)``.

Scores (Davletshina et al.: reconstruction error and discriminator output), chosen with
``score``: ``reconstruction`` = mean squared ``x - G(E(x))`` inside the mask;
``discriminator`` = ``1 - sigmoid(D(x, E(x)))`` (the probability that the pair is not
real); ``combined`` = ``(1 - score_lambda) * reconstruction + score_lambda *
discriminator`` (the weighting of Zenati et al.'s BiGAN anomaly score). Every score is
returned under its own name; ``"scalar"`` is the chosen one; the voxel map is
``|x - G(E(x))|``. Early stopping watches the reconstruction error (the adversarial losses
are measured against a discriminator that changes every step).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from uadct.errors import UadctError
from uadct.models.base import AnomalyModel, ModelConfig
from uadct.models.ganomaly import LatentEncoder, PatchDecoder, conv_pyramid, dcgan_init, frozen

GAN_SCORES = ("reconstruction", "discriminator", "combined")


def masked_mse(x: torch.Tensor, reconstruction: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """Per patch ``(B,)`` mean squared difference inside the mask (all voxels when None)."""
    squared = (x - reconstruction).square().flatten(1)
    if masks is None:
        return squared.mean(1)
    flat = masks.flatten(1)
    return (squared * flat).sum(1) / flat.sum(1).clamp_min(1.0)


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``mean relu(1 - real) + mean relu(1 + fake)`` for logits."""
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def combine_scores(reconstruction: torch.Tensor, discriminator: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * reconstruction + weight * discriminator``."""
    return (1.0 - weight) * reconstruction + weight * discriminator


def check_score_options(name: str, score: str, weight: float) -> None:
    if score not in GAN_SCORES:
        raise UadctError(f"{name}: unknown score {score!r}; expected one of {', '.join(GAN_SCORES)}")
    if not 0.0 <= weight <= 1.0:
        raise UadctError(f"{name}: score_lambda must be in [0, 1], got {weight}")


@dataclasses.dataclass
class BiGANConfig(ModelConfig):
    """BiGAN hyper-parameters (Davletshina et al.: z 100, hinge loss, discriminator lr 200x lower)."""

    latent_dim: int = 100  # size of z (prior N(0, I))
    base_channels: int = 32  # channels of the first pyramid level, doubled per level
    code_hidden: int = 256  # width of the discriminator's code branch
    discriminator_lr_ratio: float = 0.005  # discriminator learning rate / generator learning rate (paper: 5e-6 / 1e-3)
    adam_beta1: float = 0.5  # Adam beta1 of both optimisers
    score: str = "discriminator"  # "scalar" score: reconstruction, discriminator (the paper's D) or combined
    score_lambda: float = 0.5  # weight of the discriminator score in "combined"
    top_k: int = 200  # voxels averaged for the "topk" score (the paper's k)


class EncoderGeneratorGAN(AnomalyModel):
    """What BiGAN and alpha-GAN share: an encoder ``self.encoder`` and a generator ``self.generator``
    (built by the subclass) over a N(0, I) prior of ``latent_dim``; two Adam optimisers (beta1
    ``adam_beta1``, the discriminators' learning rate ``discriminator_lr_ratio`` times the
    generator's); the scores: reconstruction, discriminator (the subclass's), combined, top-k."""

    outputs = ("scalar", "voxel")

    def __init__(self, config: ModelConfig) -> None:
        check_score_options(self.name, getattr(config, "score"), getattr(config, "score_lambda"))
        super().__init__(config)

    def sample_latent(self, count: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(count, self.config.latent_dim, device=like.device, dtype=like.dtype)

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """``E(x)`` ``(B, latent_dim)``."""
        return self.encoder(patches)

    def adam_optimizers(self, learning_rate: float, generator: list[nn.Parameter],
                        discriminators: list[nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
        """``generator`` (encoder and generator parameters) and ``discriminator`` optimisers."""
        betas = (self.config.adam_beta1, 0.999)
        return {
            "generator": torch.optim.Adam(generator, lr=learning_rate, betas=betas),
            "discriminator": torch.optim.Adam(discriminators, lr=learning_rate * self.config.discriminator_lr_ratio, betas=betas),
        }

    def reconstruction_scores(self, patches: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``E(x)`` and the scores without a discriminator: ``reconstruction`` (masked MSE ``(B,)``), ``topk``
        (mean of the ``top_k`` highest voxels ``(B,)``) and ``voxel`` ``|x - G(E(x))|`` ``(B, *patch)``, 0 outside ``masks``."""
        code = self.encoder(patches)
        reconstruction = self.generator(code)
        voxel = (patches - reconstruction).abs()
        if masks is not None:
            voxel = voxel * masks
        flat = voxel.flatten(1)
        topk = flat.topk(min(self.config.top_k, flat.shape[1]), dim=1).values.mean(1)
        return code, {"reconstruction": masked_mse(patches, reconstruction, masks), "topk": topk, "voxel": voxel[:, 0]}

    def with_chosen_score(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``scores`` plus ``combined`` and ``scalar`` (the configured score)."""
        scores["combined"] = combine_scores(scores["reconstruction"], scores["discriminator"], self.config.score_lambda)
        return {**scores, "scalar": scores[self.config.score]}


class JointDiscriminator(nn.Module):
    """``D(x, z)``: image branch (conv pyramid, no batch norm), code branch (MLP), combination -> logit ``(B,)``."""

    def __init__(self, dims: int, in_channels: int, base_channels: int, patch_size: int, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.image, channels = conv_pyramid(dims, in_channels, base_channels, patch_size, batch_norm=False)
        image_features = channels * 4**dims  # the pyramid ends at 4 voxels per side
        self.code = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2))
        self.joint = nn.Sequential(nn.Linear(image_features + hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.joint(torch.cat([self.image(x).flatten(1), self.code(z)], dim=1)).flatten()


class BiGAN(EncoderGeneratorGAN):
    name = "bigan"
    summary = "BiGAN (encoder + generator + joint discriminator); score = reconstruction, discriminator or combined"
    Config = BiGANConfig

    def __init__(self, config: BiGANConfig) -> None:
        super().__init__(config)
        dims, channels, base, size, latent = config.dims, config.in_channels, config.base_channels, config.patch_size, config.latent_dim
        self.generator = PatchDecoder(dims, channels, base, size, latent)
        self.encoder = LatentEncoder(dims, channels, base, size, latent)
        self.discriminator = JointDiscriminator(dims, channels, base, size, latent, config.code_hidden)
        self.apply(dcgan_init)

    def adversarial_losses(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``discriminator`` (L_D) and ``generator`` (L_EG) hinge losses for real ``x`` and prior draws ``z``."""
        real = self.discriminator(x, self.encoder(x))
        fake = self.discriminator(self.generator(z), z)
        return {"discriminator": hinge_discriminator_loss(real, fake), "generator": real.mean() - fake.mean()}

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``loss`` = L_EG, with L_D and the masked reconstruction error."""
        losses = self.adversarial_losses(patches, self.sample_latent(len(patches), patches))
        reconstruction = masked_mse(patches, self.generator(self.encoder(patches)), masks).mean()
        return {"loss": losses["generator"], "discriminator": losses["discriminator"], "reconstruction": reconstruction}

    def configure_optimizers(self, learning_rate: float) -> dict[str, torch.optim.Optimizer]:
        return self.adam_optimizers(learning_rate, [*self.generator.parameters(), *self.encoder.parameters()],
                                    list(self.discriminator.parameters()))

    def training_step(
        self, patches: torch.Tensor, masks: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer],
        positions: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One discriminator update (E and G frozen), then one encoder + generator update (D frozen)."""
        z = self.sample_latent(len(patches), patches)
        with frozen(self.generator, self.encoder):
            disc = self.adversarial_losses(patches, z)["discriminator"]
        optimizers["discriminator"].zero_grad(set_to_none=True)
        disc.backward()
        optimizers["discriminator"].step()
        with frozen(self.discriminator):
            generator = self.adversarial_losses(patches, z)["generator"]
        optimizers["generator"].zero_grad(set_to_none=True)
        generator.backward()
        optimizers["generator"].step()
        return {"loss": float(generator.detach()), "discriminator": float(disc.detach())}

    def validation_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        """The masked reconstruction error (see the module docstring)."""
        return float(masked_mse(patches, self.generator(self.encoder(patches)), masks).mean())

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every score ``(B,)`` by name, ``scalar`` = the configured one, ``voxel`` ``|x - G(E(x))|``."""
        code, scores = self.reconstruction_scores(patches, masks)
        scores["discriminator"] = 1.0 - torch.sigmoid(self.discriminator(patches, code))
        return self.with_chosen_score(scores)
