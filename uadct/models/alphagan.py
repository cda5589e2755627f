"""alpha-GAN (Rosca et al. 2017) with the chest X-ray paper's scores (Davletshina et al.).

Four networks: encoder ``E`` ``x -> z_hat``, generator ``G`` (the decoder, from ``z_hat`` or
from ``z ~ N(0, I)``), image discriminator ``D`` (real ``x`` against reconstructions
``G(E(x))`` and samples ``G(z)``) and code discriminator ``C`` (prior draws ``z`` against
codes ``E(x)``). Hinge adversarial losses (the paper's), per batch:

- ``L_D = mean relu(1 - D(x)) + mean relu(1 + D(G(E(x)))) + mean relu(1 + D(G(z)))``;
- ``L_C = mean relu(1 - C(z)) + mean relu(1 + C(E(x)))``;
- ``L_EG = reconstruction_weight * mean_mask |x - G(E(x))| - mean D(G(E(x))) - mean D(G(z))
  - mean C(E(x))`` (encoder and generator share one optimiser; Rosca et al.'s L1
  reconstruction term, counted inside the brain mask).

Scores, chosen with ``score``: ``reconstruction`` = mean squared ``x - G(E(x))`` inside the
mask; ``discriminator`` = the paper's "C + D": the mean of ``1 - sigmoid(D(x))`` and
``1 - sigmoid(C(E(x)))`` (probabilities of not being real data / a prior draw);
``combined`` = ``(1 - score_lambda) * reconstruction + score_lambda * discriminator``.
Also returned: ``image_discriminator`` (D), ``code_discriminator`` (C) and ``topk``; the
voxel map is ``|x - G(E(x))|``. Early stopping watches the masked L1 reconstruction error.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from uadct.models.base import ModelConfig
from uadct.models.bigan import EncoderGeneratorGAN, hinge_discriminator_loss
from uadct.models.ganomaly import Discriminator, LatentEncoder, PatchDecoder, dcgan_init, frozen, masked_mean


@dataclasses.dataclass
class AlphaGANConfig(ModelConfig):
    """alpha-GAN hyper-parameters (Davletshina et al.: z 100, hinge loss, discriminators' lr 200x lower)."""

    latent_dim: int = 100  # size of z (prior N(0, I))
    base_channels: int = 32  # channels of the first pyramid level, doubled per level
    code_hidden: int = 256  # width of the code discriminator's hidden layers
    reconstruction_weight: float = 10.0  # weight of the masked L1 reconstruction term in L_EG
    discriminator_lr_ratio: float = 0.005  # discriminators' learning rate / generator learning rate (paper: 5e-6 / 1e-3)
    adam_beta1: float = 0.5  # Adam beta1 of both optimisers
    score: str = "discriminator"  # "scalar" score: reconstruction, discriminator (the paper's C + D) or combined
    score_lambda: float = 0.5  # weight of the discriminator score in "combined"
    top_k: int = 200  # voxels averaged for the "topk" score (the paper's k)


class CodeDiscriminator(nn.Module):
    """``C(z)``: a three-layer MLP -> logit ``(B,)``."""

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                                    nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z).flatten()


class AlphaGAN(EncoderGeneratorGAN):
    name = "alphagan"
    summary = "alpha-GAN (encoder, generator, image and code discriminators); score = reconstruction, C + D or combined"
    Config = AlphaGANConfig

    def __init__(self, config: AlphaGANConfig) -> None:
        super().__init__(config)
        dims, channels, base, size, latent = config.dims, config.in_channels, config.base_channels, config.patch_size, config.latent_dim
        self.encoder = LatentEncoder(dims, channels, base, size, latent)
        self.generator = PatchDecoder(dims, channels, base, size, latent)
        self.discriminator = Discriminator(dims, channels, base, size, batch_norm=False)
        self.code_discriminator = CodeDiscriminator(latent, config.code_hidden)
        self.apply(dcgan_init)

    def losses(self, x: torch.Tensor, masks: torch.Tensor | None, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``generator`` (L_EG), ``discriminator`` (L_D), ``code`` (L_C) and ``reconstruction`` (masked L1) for ``x`` and draws ``z``."""
        code = self.encoder(x)
        reconstruction = self.generator(code)
        sample = self.generator(z)
        d_real, d_rec, d_gen = (self.discriminator(v)[0] for v in (x, reconstruction, sample))
        c_prior, c_code = self.code_discriminator(z), self.code_discriminator(code)
        l1 = masked_mean((x - reconstruction).abs(), masks)
        return {
            "generator": self.config.reconstruction_weight * l1 - d_rec.mean() - d_gen.mean() - c_code.mean(),
            "discriminator": hinge_discriminator_loss(d_real, d_rec) + torch.relu(1.0 + d_gen).mean(),
            "code": hinge_discriminator_loss(c_prior, c_code),
            "reconstruction": l1,
        }

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        terms = self.losses(patches, masks, self.sample_latent(len(patches), patches))
        return {"loss": terms["generator"], **{k: v for k, v in terms.items() if k != "generator"}}

    def configure_optimizers(self, learning_rate: float) -> dict[str, torch.optim.Optimizer]:
        return self.adam_optimizers(learning_rate, [*self.encoder.parameters(), *self.generator.parameters()],
                                    [*self.discriminator.parameters(), *self.code_discriminator.parameters()])

    def training_step(
        self, patches: torch.Tensor, masks: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer],
        positions: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One update of both discriminators (E, G frozen), then one encoder + generator update (D, C frozen)."""
        z = self.sample_latent(len(patches), patches)
        with frozen(self.encoder, self.generator):
            terms = self.losses(patches, masks, z)
            disc = terms["discriminator"] + terms["code"]
        optimizers["discriminator"].zero_grad(set_to_none=True)
        disc.backward()
        optimizers["discriminator"].step()
        with frozen(self.discriminator, self.code_discriminator):
            generator = self.losses(patches, masks, z)
        optimizers["generator"].zero_grad(set_to_none=True)
        generator["generator"].backward()
        optimizers["generator"].step()
        return {"loss": float(generator["generator"].detach()), "discriminator": float(terms["discriminator"].detach()),
                "code": float(terms["code"].detach()), "reconstruction": float(generator["reconstruction"].detach())}

    def validation_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        """The masked L1 reconstruction error (the adversarial terms move with the discriminators)."""
        return float(masked_mean((patches - self.generator(self.encoder(patches))).abs(), masks))

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every score ``(B,)`` by name, ``scalar`` = the configured one, ``voxel`` ``|x - G(E(x))|``."""
        code, scores = self.reconstruction_scores(patches, masks)
        image = 1.0 - torch.sigmoid(self.discriminator(patches)[0])
        code_score = 1.0 - torch.sigmoid(self.code_discriminator(code))
        scores.update(discriminator=0.5 * (image + code_score), image_discriminator=image, code_discriminator=code_score)
        return self.with_chosen_score(scores)
