"""Denoising autoencoder as Kascenas et al. ran it (MIDL 2022; MedIA 2023): a U-Net on large patches.

The small ``dae`` sees 16 px patches; here the network sees most of a slice (64-128 px
patches; 64 px on the 2 mm atlas grid cover 128 mm), which is the context the paper
says matters. Training adds coarse Gaussian noise inside the brain mask (drawn on a
lattice of one value per ``noise_cell`` voxels and interpolated, the paper's 16x16 noise
on 128 px slices being ``noise_cell = 8``) and minimises the masked L2 error of the
restoration; the anomaly map is ``|x - f(x)|`` on the clean input. The U-Net predicts the
correction ``f(x) - x`` (residual output), which trains several times faster from scratch.
"""

from __future__ import annotations

import dataclasses

import torch

from uadct.errors import UadctError
from uadct.models.base import ModelConfig
from uadct.models.dae import coarse_noise
from uadct.models.unet import UNetModel


@dataclasses.dataclass
class DAEUNetConfig(ModelConfig):
    """U-Net width and depth, coarse noise cell and strength."""

    base_channels: int = 16  # channels of the first U-Net level, doubled per level
    levels: int = 3  # poolings; patch_size must be divisible by 2**levels
    noise_cell: int = 8  # voxels per noise lattice cell (paper: 128 px slice, 16 px lattice)
    noise_std: float = 0.2  # per-voxel noise standard deviation, normalised intensity units (paper: 0.2)


class DenoisingUNet(UNetModel):
    """Large-patch U-Net denoiser; voxel map = restoration error of the clean input."""

    name = "dae-unet"
    summary = "denoising U-Net on large patches with coarse noise (Kascenas et al.); map = |x - f(x)|"
    outputs = ("voxel", "scalar")
    Config = DAEUNetConfig

    def __init__(self, config: DAEUNetConfig) -> None:
        super().__init__(config, out_channels=config.in_channels)
        if config.noise_cell < 1 or config.patch_size % config.noise_cell:
            raise UadctError(f"{self.name}: patch size {config.patch_size} must be divisible by noise_cell = {config.noise_cell}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restored patch ``(B, 1, *patch)``: the input plus the U-Net's correction (residual
        learning, as in DnCNN: the same function class, but training starts at the identity)."""
        return x + self.unet(x)

    def corrupt(self, patches: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``patches`` plus coarse noise inside ``masks``: ``(B, 1, *patch)``."""
        grid = self.config.patch_size // self.config.noise_cell
        noise = coarse_noise(tuple(patches.shape), grid, self.config.noise_std, generator, patches.device)
        return patches + noise.to(patches.dtype) * masks

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mean squared restoration error over the brain voxels: sum(m (f(x + n m) - x)^2) / sum(m)."""
        error = (self(self.corrupt(patches, masks, generator)).float() - patches).square() * masks
        return {"loss": error.sum() / masks.sum().clamp_min(1.0)}

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``"voxel"`` = |x - f(x)| ``(B, *patch)`` (0 outside ``masks``); ``"scalar"`` its mean ``(B,)``."""
        return self.voxel_scores((patches - self(patches).float()).abs(), masks)
