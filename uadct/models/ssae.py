"""Scale-space autoencoder (SSAE; Baur et al. 2020, the head-CT study's "Scale Space Autoencoder").

The patch is split into a Laplacian pyramid of ``bands`` bands. With ``G_0 = x`` and
``G_{k+1} = down(G_k)`` (2x average pooling), band ``k < K-1`` is the detail
``L_k = G_k - up(G_{k+1})`` at ``P / 2**k`` voxels per side (``up``: linear
interpolation), and the last band is the coarse image ``L_{K-1} = G_{K-1}``.
:func:`collapse` (``G_k = L_k + up(G_{k+1})`` from the top down) gives the patch back
exactly, up to float rounding. Each band is reconstructed by its own small
autoencoder (:class:`BandAutoencoder`), so every scale has its own bottleneck.

Loss (the sum of per-band reconstruction losses): ``sum_k sum(M_k (L_k - L_hat_k)^2) /
sum(M_k)`` with ``M_k`` the brain mask at band ``k``'s resolution (a voxel of a coarse band
counts when any voxel under it is brain). Scores: the band residuals ``L_k - L_hat_k``
are recombined by :func:`collapse` (linear, so it equals ``x - collapse(L_hat)``); the
voxel map is its absolute value inside the mask, ``"scalar"`` its mean square, and each
band's mean squared residual is reported as ``band<k>``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from uadct.errors import UadctError
from uadct.models.base import AnomalyModel, ModelConfig
from uadct.models.layers import conv_layer, deconv_layer, norm_layer


@dataclasses.dataclass
class SSAEConfig(ModelConfig):
    """Number of pyramid bands, and the size of each band's autoencoder."""

    bands: int = 3  # Laplacian pyramid bands (patch_size must be divisible by 2**(bands-1))
    base_channels: int = 16  # channels of each band autoencoder's first conv block, doubled per block
    latent_dim: int = 32  # bottleneck size of each band autoencoder


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2) if x.dim() == 4 else F.avg_pool3d(x, 2)


def _up(x: torch.Tensor) -> torch.Tensor:
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)


def laplacian_pyramid(x: torch.Tensor, bands: int) -> list[torch.Tensor]:
    """``(B, C, *patch)`` -> ``bands`` tensors, finest first: details ``G_k - up(G_{k+1})``, then the coarse ``G_{K-1}``."""
    if bands < 1:
        raise UadctError(f"ssae: need at least 1 band, got {bands}")
    gaussian = [x]
    for _ in range(bands - 1):
        gaussian.append(_down(gaussian[-1]))
    return [g - _up(coarser) for g, coarser in zip(gaussian[:-1], gaussian[1:])] + [gaussian[-1]]


def collapse(bands: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`laplacian_pyramid`: ``G_k = L_k + up(G_{k+1})`` from the coarsest band down."""
    image = bands[-1]
    for detail in reversed(bands[:-1]):
        image = detail + _up(image)
    return image


def band_masks(masks: torch.Tensor, bands: int) -> list[torch.Tensor]:
    """The mask at each band's resolution: a coarse voxel is brain when any voxel under it is."""
    pool = F.max_pool2d if masks.dim() == 4 else F.max_pool3d
    result = [(masks > 0).to(masks.dtype)]
    for _ in range(bands - 1):
        result.append(pool(result[-1], 2))
    return result


class BandAutoencoder(nn.Module):
    """A small conv autoencoder for one band: stride-2 blocks down to 4 voxels per side (none below), a linear bottleneck."""

    def __init__(self, dims: int, channels: int, size: int, base_channels: int, latent_dim: int) -> None:
        super().__init__()
        levels = max(0, int(math.log2(size)) - 2)
        widths = [channels] + [base_channels * 2**i for i in range(levels)]
        down: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            down += [conv_layer(dims)(c_in, c_out, 4, 2, 1), norm_layer(dims)(c_out), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*down)
        self.feature_shape = (widths[-1],) + (size // 2**levels,) * dims
        flat = math.prod(self.feature_shape)
        self.to_latent = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        up: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths[::-1][:-1], widths[::-1][1:])):
            up.append(deconv_layer(dims)(c_in, c_out, 4, 2, 1))
            if i < levels - 1:  # the last layer outputs band values directly
                up += [norm_layer(dims)(c_out), nn.LeakyReLU(0.2)]
        self.decoder = nn.Sequential(*up)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.encoder(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.from_latent(self.encode(x)).view((-1,) + self.feature_shape))


class ScaleSpaceAutoencoder(AnomalyModel):
    name = "ssae"
    summary = "scale-space autoencoder (one AE per Laplacian band); voxel map = recombined band residuals"
    outputs = ("voxel", "scalar")
    Config = SSAEConfig

    def __init__(self, config: SSAEConfig) -> None:
        super().__init__(config)
        size, bands = config.patch_size, config.bands
        if bands < 1 or size % 2 ** (bands - 1) or size // 2 ** (bands - 1) < 2:
            raise UadctError(f"ssae: patch size {size} must be divisible by 2**(bands-1) = {2 ** max(0, bands - 1)} "
                             f"with at least 2 voxels in the coarsest band (bands={bands})")
        self.band_models = nn.ModuleList(
            BandAutoencoder(config.dims, config.in_channels, size // 2**k, config.base_channels, config.latent_dim) for k in range(bands)
        )

    def reconstruct_bands(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The pyramid of ``x`` and each band's reconstruction (finest first)."""
        bands = laplacian_pyramid(x, self.config.bands)
        return bands, [model(band) for model, band in zip(self.band_models, bands)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(B, C, *patch)``: the collapsed reconstructed bands."""
        return collapse(self.reconstruct_bands(x)[1])

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Latent features ``(B, bands * latent_dim)``: every band's code, finest first."""
        bands = laplacian_pyramid(patches, self.config.bands)
        return torch.cat([model.encode(band) for model, band in zip(self.band_models, bands)], dim=1)

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        bands, reconstructed = self.reconstruct_bands(patches)
        losses = {}
        for k, (band, estimate, mask) in enumerate(zip(bands, reconstructed, band_masks(masks, len(bands)))):
            losses[f"band{k}"] = ((band - estimate).square() * mask).sum() / mask.sum().clamp_min(1.0)
        return {"loss": sum(losses.values()), **losses}

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``voxel`` |collapse(L - L_hat)| ``(B, *patch)``, ``scalar`` its mean square, ``band<k>`` per-band mean squares."""
        bands, reconstructed = self.reconstruct_bands(patches)
        residuals = [band - estimate for band, estimate in zip(bands, reconstructed)]
        voxel = collapse(residuals).abs()
        if masks is not None:
            voxel = voxel * masks
        flat = voxel.flatten(1)
        return {"voxel": voxel[:, 0], "scalar": flat.square().mean(1),
                **{f"band{k}": r.flatten(1).square().mean(1) for k, r in enumerate(residuals)}}
