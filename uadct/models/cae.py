"""Convolutional autoencoder (conv + batch norm + leaky ReLU + dropout blocks).

Trained with a reconstruction loss counted only inside the brain mask; the voxel map
is the reconstruction error, and patch scalars are the mean squared error, the mean
absolute error, or the mean of the top-k voxel errors (Davletshina et al.).

With ``position_conditioning`` the decoder is conditional: the patch centre ``(B, 3)``
in normalised atlas coordinates is concatenated to the latent code before it is
expanded back to feature maps, so the decoder can reconstruct what is normal at that
place while the encoder stays a plain image encoder. Covariate conditioning (``covariates``
> 0, :mod:`uadct.covariates`) appends the subject's encoded covariates (age, sex) the same way.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from uadct.models.base import AnomalyModel, ModelConfig
from uadct.models.layers import POSITION_FEATURES, conv_layer, deconv_layer, dropout_layer, norm_layer


@dataclasses.dataclass
class CAEConfig(ModelConfig):
    """CAE hyper-parameters: channels of the first block (doubled per block), latent size."""

    base_channels: int = 16  # channels of the first conv block, doubled per block
    latent_dim: int = 32  # size of the bottleneck code
    dropout: float = 0.1  # channel dropout after every encoder block
    loss: str = "mse"  # "mse" or "l1"
    top_k: int = 64  # voxels averaged for the "topk" patch score


class ConvolutionalAutoencoder(AnomalyModel):
    name = "cae"
    summary = "convolutional autoencoder; voxel map = reconstruction error (MSE/L1/top-k scores)"
    outputs = ("voxel", "scalar")
    Config = CAEConfig
    supports_positions = True
    supports_covariates = True

    def __init__(self, config: CAEConfig) -> None:
        super().__init__(config)
        dims, size = config.dims, config.patch_size
        levels = 3 if size >= 16 else 2
        channels = [config.in_channels] + [config.base_channels * 2**i for i in range(levels)]
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            encoder += [conv_layer(dims)(c_in, c_out, 4, 2, 1), norm_layer(dims)(c_out), nn.LeakyReLU(0.2), dropout_layer(dims)(config.dropout)]
        self.encoder = nn.Sequential(*encoder)
        self.bottom = size // 2**levels
        flat = channels[-1] * self.bottom**dims
        self.to_latent = nn.Linear(flat, config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim + (POSITION_FEATURES if config.position_conditioning else 0) + config.covariates, flat)
        decoder: list[nn.Module] = []
        reversed_channels = channels[::-1]
        for i, (c_in, c_out) in enumerate(zip(reversed_channels[:-1], reversed_channels[1:])):
            decoder.append(deconv_layer(dims)(c_in, c_out, 4, 2, 1))
            if i < levels - 1:  # the last layer outputs intensities directly
                decoder += [norm_layer(dims)(c_out), nn.LeakyReLU(0.2)]
        self.decoder = nn.Sequential(*decoder)
        self._feature_shape = (channels[-1],) + (self.bottom,) * dims

    def decode(self, latent: torch.Tensor, positions: torch.Tensor | None = None, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_dim)`` (+ positions ``(B, 3)``, + covariates ``(B, K)`` when conditioned) ``-> (B, 1, *patch)``."""
        if self.uses_positions:
            latent = torch.cat([latent, self.require_positions(positions, len(latent)).to(latent.dtype)], dim=1)
        if self.uses_covariates:
            latent = torch.cat([latent, self.require_covariates(covariates, len(latent)).to(latent.dtype)], dim=1)
        return self.decoder(self.from_latent(latent).view((-1,) + self._feature_shape))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``(B, 1, *patch)``."""
        return self.decode(self.encode_features(x), positions, covariates)

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The latent code ``(B, latent_dim)`` (features of the forest scorer, :mod:`uadct.forest`)."""
        return self.to_latent(self.encoder(patches).flatten(1))

    def _error(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        difference = x - reconstruction
        return difference.abs() if self.config.loss == "l1" else difference.square()

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        error = self._error(patches, self(patches, positions, covariates)) * masks
        loss = error.sum() / masks.sum().clamp_min(1.0)
        return {"loss": loss}

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        reconstruction = self(patches, positions, covariates)
        voxel = (patches - reconstruction).abs()
        if masks is not None:
            voxel = voxel * masks
        flat = voxel.flatten(1)
        k = min(self.config.top_k, flat.shape[1])
        return {
            "voxel": voxel[:, 0],
            "scalar": flat.square().mean(1),
            "l1": flat.mean(1),
            "topk": flat.topk(k, dim=1).values.mean(1),
        }
