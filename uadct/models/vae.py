"""Variational autoencoder: the CAE's conv blocks with a Gaussian latent (Davletshina et al.).

The encoder gives a mean and a log-variance per latent unit; training decodes a sample
drawn with the reparameterisation trick, inference decodes the mean so scores are
deterministic. Loss scaling: ``(sum of masked voxel errors + beta * sum of KLDs) /
number of masked voxels`` -- the negative ELBO per voxel (for a Gaussian decoder), so the
reconstruction term keeps the CAE's per-voxel scale and ``beta = 1`` is the plain ELBO.
Patch scores: MSE, L1, KLD (per voxel of the patch, the same scaling), MSE + beta * KLD,
and the mean of the top-k voxel errors; the voxel map is the reconstruction error.
Position conditioning works as in the CAE (centres appended to the latent code before decoding).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from uadct.errors import UadctError
from uadct.models.cae import CAEConfig, ConvolutionalAutoencoder

VAE_SCORES = ("mse", "l1", "kld", "mse_kld", "topk")
LOG_VARIANCE_LIMIT = 10.0  # clamp for exp(logvar): keeps early training finite


@dataclasses.dataclass
class VAEConfig(CAEConfig):
    """VAE hyper-parameters: the CAE's, plus the KLD weight and which score is ``"scalar"``."""

    beta: float = 1.0  # weight of the KL divergence (1 = plain ELBO)
    top_k: int = 200  # voxels; the paper's k, capped at the patch size
    score: str = "mse"  # one of VAE_SCORES


def gaussian_kl_divergence(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_variance)) || N(0, I)) per sample, in nats: ``(B, L) -> (B,)``."""
    return 0.5 * (mean.square() + log_variance.exp() - 1.0 - log_variance).sum(1)


class VariationalAutoencoder(ConvolutionalAutoencoder):
    """A CAE whose bottleneck outputs ``(mean, log_variance)`` of a Gaussian latent."""

    name = "vae"
    summary = "variational autoencoder; voxel map = reconstruction error (MSE/L1/KLD/MSE+KLD/top-k scores)"
    outputs = ("voxel", "scalar")
    Config = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        if config.score not in VAE_SCORES:
            raise UadctError(f"vae: unknown score {config.score!r}; expected one of {', '.join(VAE_SCORES)}")
        if config.beta < 0:
            raise UadctError(f"vae: beta must be >= 0, got {config.beta}")
        super().__init__(config)
        # Same blocks as the CAE; only the bottleneck doubles to give mean and log-variance.
        self.to_latent = nn.Linear(self.to_latent.in_features, 2 * config.latent_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, *patch) -> (mean, log_variance)``, each ``(B, latent_dim)``."""
        mean, log_variance = self.to_latent(self.encoder(x).flatten(1)).chunk(2, dim=1)
        return mean, log_variance.clamp(-LOG_VARIANCE_LIMIT, LOG_VARIANCE_LIMIT)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic reconstruction from the latent mean, ``(B, 1, *patch)``."""
        return self.decode(self.encode(x)[0], positions, covariates)

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The latent mean ``(B, latent_dim)``."""
        return self.encode(patches)[0]

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Negative ELBO per masked voxel; samples the latent in train mode, uses the mean in eval."""
        mean, log_variance = self.encode(patches)
        latent = mean + torch.randn_like(mean) * (0.5 * log_variance).exp() if self.training else mean
        voxels = masks.sum().clamp_min(1.0)
        reconstruction = (self._error(patches, self.decode(latent, positions, covariates)) * masks).sum() / voxels
        kld = gaussian_kl_divergence(mean, log_variance).sum() / voxels
        return {"loss": reconstruction + self.config.beta * kld, "reconstruction": reconstruction, "kld": kld}

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``"voxel"`` ``(B, *patch)``; every patch score ``(B,)``; ``"scalar"`` = the configured one."""
        mean, log_variance = self.encode(patches)
        voxel = (patches - self.decode(mean, positions, covariates)).abs()
        if masks is not None:
            voxel = voxel * masks
        flat = voxel.flatten(1)
        k = min(self.config.top_k, flat.shape[1])
        mse = flat.square().mean(1)
        kld = gaussian_kl_divergence(mean, log_variance) / flat.shape[1]
        scores = {
            "mse": mse,
            "l1": flat.mean(1),
            "kld": kld,
            "mse_kld": mse + self.config.beta * kld,
            "topk": flat.topk(k, dim=1).values.mean(1),
        }
        return {"voxel": voxel[:, 0], **scores, "scalar": scores[self.config.score]}
