"""Denoising autoencoder with coarse noise (Kascenas et al., MIDL 2022).

Training corrupts each patch inside the brain mask with low-resolution Gaussian noise
(sampled on a grid ``noise_downsample`` times coarser than the patch, upsampled linearly,
shifted by a random sub-cell offset so the grid does not sit at fixed positions, and
rescaled so every voxel's noise has standard deviation ``noise_std``), and a small UNet
learns to restore the clean patch (masked L2 loss). Smooth noise looks like a plausible
intensity change, so the network learns to pull anything unusual back to healthy
appearance; at inference the clean input's restoration error is the anomaly map.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from uadct.errors import UadctError
from uadct.models.base import CorruptionModel, ModelConfig
from uadct.models.layers import conv_layer, deconv_layer, norm_layer


@dataclasses.dataclass
class DAEConfig(ModelConfig):
    """DAE hyper-parameters: UNet width and depth, coarse noise grid and strength."""

    base_channels: int = 16  # channels of the first UNet level, doubled per level
    levels: int = 2  # down-samplings; patch_size must be divisible by 2**levels
    noise_downsample: int = 4  # noise grid = patch_size / this per side (paper: 128 px image, 16 px grid)
    noise_std: float = 0.2  # in normalised intensity units (paper: 0.2)


def _interpolation_mode(dims: int) -> str:
    return "bilinear" if dims == 2 else "trilinear"


def coarse_noise(
    shape: tuple[int, ...],
    grid: int,
    std: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Smooth Gaussian noise ``shape = (B, C, *patch)`` (cubic patches), standard deviation ``std`` per voxel.

    Gaussian values on a lattice of ``grid + 2`` points per side are interpolated
    linearly (corners aligned) to the patch plus one cell per side, divided by the interpolation's own
    per-voxel standard deviation (linear interpolation of i.i.d. values shrinks the
    variance between lattice points), and cropped at a random offset per sample.
    """
    batch, channels, *patch = shape
    size, dims = patch[0], len(patch)
    if any(p != size for p in patch):
        raise UadctError(f"coarse_noise: patches must be cubic, got {tuple(patch)}")
    if grid < 1 or size % grid:
        raise UadctError(f"coarse_noise: patch size {size} is not divisible by the noise grid {grid}")
    cell = size // grid
    full = size + cell
    mode = _interpolation_mode(dims)
    lattice = torch.randn((batch, channels) + (grid + 2,) * dims, generator=generator, device=device)
    field = F.interpolate(lattice, size=(full,) * dims, mode=mode, align_corners=True)
    # Per-voxel standard deviation of the interpolation, sqrt(sum of squared weights);
    # (bi/tri)linear weights are a product over axes, so the variance is too.
    basis = torch.eye(grid + 2, device=device).unsqueeze(1)
    variance_1d = F.interpolate(basis, size=full, mode="linear", align_corners=True).square().sum(0)[0]
    variance = variance_1d
    for _ in range(dims - 1):
        variance = variance.unsqueeze(-1) * variance_1d
    field = field * (std / variance.sqrt())
    offsets = torch.randint(0, cell, (batch, dims), generator=generator, device=device)
    steps = torch.arange(size, device=device)
    index: list[torch.Tensor] = [torch.arange(batch, device=device).view((batch,) + (1,) * (dims + 1))]
    index.append(torch.arange(channels, device=device).view((1, channels) + (1,) * dims))
    for axis in range(dims):
        view = [batch, 1] + [1] * dims
        view[2 + axis] = size
        index.append((offsets[:, axis, None] + steps).view(view))
    return field[tuple(index)]


class _ConvBlock(nn.Sequential):
    def __init__(self, dims: int, c_in: int, c_out: int) -> None:
        super().__init__(conv_layer(dims)(c_in, c_out, 3, 1, 1), norm_layer(dims)(c_out), nn.LeakyReLU(0.2))


class DenoisingAutoencoder(CorruptionModel):
    """A small UNet (stride-2 convs down, transposed convs up, skip connections)."""

    name = "dae"
    summary = "denoising autoencoder with coarse noise (UNet); voxel map = restoration error"
    outputs = ("voxel", "scalar")
    Config = DAEConfig

    def __init__(self, config: DAEConfig) -> None:
        super().__init__(config)
        dims, size = config.dims, config.patch_size
        if config.levels < 1 or size % 2**config.levels:
            raise UadctError(f"dae: patch size {size} must be divisible by 2**levels = {2**config.levels}")
        if config.noise_downsample < 1 or size % config.noise_downsample:
            raise UadctError(f"dae: patch size {size} must be divisible by noise_downsample = {config.noise_downsample}")
        channels = [config.base_channels * 2**i for i in range(config.levels + 1)]
        self.stem = _ConvBlock(dims, config.in_channels, channels[0])
        self.down = nn.ModuleList(
            nn.Sequential(conv_layer(dims)(c_in, c_out, 4, 2, 1), norm_layer(dims)(c_out), nn.LeakyReLU(0.2))
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.up = nn.ModuleList(deconv_layer(dims)(c_out, c_in, 4, 2, 1) for c_in, c_out in zip(channels[:-1], channels[1:]))
        self.merge = nn.ModuleList(_ConvBlock(dims, 2 * c_in, c_in) for c_in in channels[:-1])
        self.head = conv_layer(dims)(channels[0], config.in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restored patch ``(B, 1, *patch)``."""
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        features = skips.pop()
        for up, merge in zip(reversed(self.up), reversed(self.merge)):
            features = merge(torch.cat([up(features), skips.pop()], dim=1))
        return self.head(features)

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The bottleneck feature maps averaged over space ``(B, channels)`` (forest scorer features)."""
        features = self.stem(patches)
        for down in self.down:
            features = down(features)
        return features.flatten(2).mean(2)

    def corrupt(self, patches: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Add coarse noise inside the mask: ``(B, 1, *patch)``."""
        grid = self.config.patch_size // self.config.noise_downsample
        noise = coarse_noise(tuple(patches.shape), grid, self.config.noise_std, generator, patches.device)
        return patches + noise * masks

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Masked mean squared error between the restored noisy patch and the clean one."""
        error = (self(self.corrupt(patches, masks, generator)) - patches).square() * masks
        return {"loss": error.sum() / masks.sum().clamp_min(1.0)}

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``"voxel"`` = |x - f(x)| ``(B, *patch)`` on the clean input; ``"scalar"`` its mean ``(B,)``."""
        return self.voxel_scores((patches - self(patches)).abs(), masks)
