"""Progressive GANomaly (Madzia-Madzou & Kuijf 2022): GANomaly grown from 8x8 to the patch size.

The structure and losses are GANomaly's (:mod:`uadct.models.ganomaly`: encoder ``G_E``,
decoder ``G_D``, second encoder ``E``, critic ``D``; weights 1/70/10; score = encoder
error normalised per latent element by the training median/MAD), but the networks grow
ProGAN-style (Karras et al. 2018), trained as a WGAN-GP by default:

* **Stages.** Stage ``s`` works at ``start_size * 2**s`` voxels per side (8 -> 16 -> 32),
  the last stage at ``patch_size``. The engine's patches always have the full size; the
  model average-pools them (and their masks) to the current resolution, so the sampler
  is the same for every stage. Every layer of every stage exists from the start (the
  state dict never changes shape); layers of later stages get no gradients until used.
* **Networks.** Encoders and critic: a 1x1 "from image" convolution at the input
  resolution, then the DCGAN blocks (4x4 stride-2 convolution, [batch norm], leaky
  ReLU) down to 4x4, then a 4x4 convolution to the latent code (encoders) or the logit
  (critic, which has no batch norm: the gradient penalty is per sample). Decoder: a 4x4
  projection of ``z``, stride-2 transposed-convolution blocks up to the current
  resolution, and a linear 1x1 "to image" convolution. Channels at the level of
  resolution ``P / 2**l`` are ``base_channels * 2**l / 2``.
* **Fade-in.** For the first ``fade_patches`` training patches of a new stage, the new
  blocks are blended with the previous resolution's path, ``alpha * new + (1 - alpha)
  * old``, ``alpha = patches seen in the stage / fade_patches`` rising linearly 0 -> 1:
  decoder output = ``alpha * to_image(new block) + (1 - alpha) * upsample(to_image_old)``;
  encoder/critic input = ``alpha * new block(from_image(x)) + (1 - alpha) *
  from_image_old(avgpool(x))``; the real patches are blended the same way
  (``alpha * x + (1 - alpha) * upsample(avgpool(x))``), so the critic compares like
  with like.
* **Growth.** The engine's early stopping triggers the jump (the paper's rule): when
  the validation loss has not improved for ``patience`` epochs, the engine reloads the
  stage's best epoch and calls :meth:`advance_stage`, which moves to the next
  resolution and returns True (False at the last stage: training ends). The engine
  then starts a new best-loss record, so only the last stage's best epoch is kept.
  During a fade-in the validation loss is reported as ``FADE_IN_VALIDATION +
  patches left in the fade``: a number far above any real loss that falls every epoch,
  so fade-in epochs never exhaust the patience and the first epoch after the fade
  always beats them (as f-AnoGAN's GAN phase).

``stage`` and ``stage_patches`` are buffers: a checkpoint or a resumed run is in the
same stage with the same alpha. A model whose training ended before the last stage
scores at its current resolution (reconstructions upsampled to the patch); a warning
is logged.

Paper settings: alpha rises over 750,000 images (``fade_patches=750000``; the default
here, 65,536, is 8 epochs of the engine's default 8192 patches per epoch).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

from uadct.errors import UadctError
from uadct.models.ganomaly import BOTTOM_SIZE, GANomaly, GANomalyConfig, pyramid_levels
from uadct.models.layers import conv_layer, deconv_layer, norm_layer

log = logging.getLogger(__name__)

FADE_IN_VALIDATION = 1e12  # validation loss reported during a fade-in, plus the patches left


def level_channels(base_channels: int, level: int) -> int:
    """Feature channels at pyramid level ``level`` (resolution ``patch / 2**level``)."""
    return max(1, base_channels * 2**level // 2)


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return x
    return (F.avg_pool2d if x.dim() == 4 else F.avg_pool3d)(x, factor)


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


class GrowingPyramid(nn.Module):
    """``(B, C, r, r) -> (B, c, 4, 4)`` for ``r = patch / 2**level``, with fade-in from ``level + 1``.

    ``from_image[l]``: 1x1 convolution + leaky ReLU at level ``l``; ``blocks[l]`` halves the
    resolution from level ``l`` to ``l + 1``.
    """

    def __init__(self, dims: int, in_channels: int, base_channels: int, patch_size: int, batch_norm: bool) -> None:
        super().__init__()
        levels = pyramid_levels(patch_size)
        self.from_image = nn.ModuleList(
            nn.Sequential(conv_layer(dims)(in_channels, level_channels(base_channels, l), 1), nn.LeakyReLU(0.2)) for l in range(levels)
        )
        blocks = []
        for l in range(levels):
            c_in, c_out = level_channels(base_channels, l), level_channels(base_channels, l + 1)
            layers: list[nn.Module] = [conv_layer(dims)(c_in, c_out, 4, 2, 1, bias=not batch_norm)]
            if batch_norm:
                layers.append(norm_layer(dims)(c_out))
            layers.append(nn.LeakyReLU(0.2))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = level_channels(base_channels, levels)

    def forward(self, x: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        h = self.blocks[level](self.from_image[level](x))
        if alpha < 1.0:
            h = alpha * h + (1.0 - alpha) * self.from_image[level + 1](_pool(x, 2))
        for block in self.blocks[level + 1 :]:
            h = block(h)
        return h


class GrowingEncoder(nn.Module):
    """``(B, C, r, r) -> (B, latent)``: growing pyramid + 4x4 convolution."""

    def __init__(self, dims: int, in_channels: int, base_channels: int, patch_size: int, latent_dim: int) -> None:
        super().__init__()
        self.features = GrowingPyramid(dims, in_channels, base_channels, patch_size, batch_norm=True)
        self.to_latent = conv_layer(dims)(self.features.out_channels, latent_dim, BOTTOM_SIZE, 1, 0)

    def forward(self, x: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        return self.to_latent(self.features(x, level, alpha)).flatten(1)


class GrowingCritic(nn.Module):
    """``(B, C, r, r) -> (logit (B,), features (B, n_d))``, no batch norm."""

    def __init__(self, dims: int, in_channels: int, base_channels: int, patch_size: int) -> None:
        super().__init__()
        self.features = GrowingPyramid(dims, in_channels, base_channels, patch_size, batch_norm=False)
        self.classifier = conv_layer(dims)(self.features.out_channels, 1, BOTTOM_SIZE, 1, 0)

    def forward(self, x: torch.Tensor, level: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x, level, alpha)
        return self.classifier(features).flatten(), features.flatten(1)


class GrowingDecoder(nn.Module):
    """``(B, inputs) -> (B, C, r, r)``: 4x4 projection, transposed-convolution blocks, 1x1 to image.

    ``ups[l]`` doubles the resolution from level ``l + 1`` to ``l``; ``to_image[l]`` is linear.
    """

    def __init__(self, dims: int, out_channels: int, base_channels: int, patch_size: int, inputs: int) -> None:
        super().__init__()
        self.dims = dims
        levels = pyramid_levels(patch_size)
        top = level_channels(base_channels, levels)
        self.project = nn.Sequential(deconv_layer(dims)(inputs, top, BOTTOM_SIZE, 1, 0, bias=False), norm_layer(dims)(top), nn.ReLU())
        self.ups = nn.ModuleList(
            nn.Sequential(
                deconv_layer(dims)(level_channels(base_channels, l + 1), level_channels(base_channels, l), 4, 2, 1, bias=False),
                norm_layer(dims)(level_channels(base_channels, l)),
                nn.ReLU(),
            )
            for l in range(levels)
        )
        self.to_image = nn.ModuleList(conv_layer(dims)(level_channels(base_channels, l), out_channels, 1) for l in range(levels))

    def forward(self, z: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        h = self.project(z.view(z.shape + (1,) * self.dims))
        previous = h
        for l in range(len(self.ups) - 1, level - 1, -1):
            previous, h = h, self.ups[l](h)
        image = self.to_image[level](h)
        if alpha < 1.0:
            image = alpha * image + (1.0 - alpha) * _upsample(self.to_image[level + 1](previous), 2)
        return image


@dataclasses.dataclass
class ProgressiveGANomalyConfig(GANomalyConfig):
    """GANomaly's hyper-parameters (same defaults), a WGAN-GP critic, and the growth schedule."""

    adversarial_loss: str = "wgan-gp"  # the paper's; "bce" also works (critic without batch norm)
    start_size: int = 8  # first stage's resolution (voxels per side; a power of two >= 8)
    fade_patches: int = 65536  # training patches over which alpha rises 0 -> 1 in each new stage (paper: 750000)


class ProgressiveGANomaly(GANomaly):
    name = "progressive-ganomaly"
    summary = "GANomaly grown 8x8 -> patch size (WGAN-GP, ProGAN fade-in; early stopping triggers growth)"
    outputs = ("scalar", "voxel")
    Config = ProgressiveGANomalyConfig

    def __init__(self, config: ProgressiveGANomalyConfig) -> None:
        levels = pyramid_levels(config.patch_size)
        if config.start_size < 2 * BOTTOM_SIZE or config.start_size & (config.start_size - 1) or config.start_size > config.patch_size:
            raise UadctError(
                f"{self.name}: start_size must be a power of two between 8 and the patch size {config.patch_size}, got {config.start_size}"
            )
        if config.fade_patches < 0:
            raise UadctError(f"{self.name}: fade_patches must be >= 0, got {config.fade_patches}")
        super().__init__(config)
        self.start_level = levels - int(math.log2(config.start_size // BOTTOM_SIZE))
        self.stages = self.start_level + 1
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))
        self.register_buffer("stage_patches", torch.zeros((), dtype=torch.long))

    def build_networks(self) -> None:
        config = self.config
        dims, channels, base, size, latent = config.dims, config.in_channels, config.base_channels, config.patch_size, config.latent_dim
        self.encoder = GrowingEncoder(dims, channels, base, size, latent)
        self.decoder = GrowingDecoder(dims, channels, base, size, self.decoder_inputs)
        self.second_encoder = GrowingEncoder(dims, channels, base, size, latent)
        self.discriminator = GrowingCritic(dims, channels, base, size)

    # ------------------------------------------------------------------ growth state
    @property
    def level(self) -> int:
        """Pyramid level of the current stage: its resolution is ``patch_size / 2**level``."""
        return self.start_level - int(self.stage)

    @property
    def resolution(self) -> int:
        """Voxels per side the networks work at in the current stage."""
        return self.config.patch_size // 2**self.level

    @property
    def alpha(self) -> float:
        """Fade-in weight of the current stage's new blocks (1 in the first stage and after the fade)."""
        if int(self.stage) == 0 or self.config.fade_patches == 0:
            return 1.0
        return min(1.0, int(self.stage_patches) / self.config.fade_patches)

    @property
    def is_final_stage(self) -> bool:
        return int(self.stage) == self.stages - 1

    def advance_stage(self) -> bool:
        """Grow to the next resolution (alpha restarts at 0); False at the last stage."""
        if self.is_final_stage:
            return False
        self.stage += 1
        self.stage_patches.zero_()
        log.info("%s: growing to %d voxels per side (stage %d of %d)", self.name, self.resolution, int(self.stage) + 1, self.stages)
        return True

    # ------------------------------------------------------------------ GANomaly hooks
    def prepare(self, patches: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Average-pool patches and masks to the current resolution; during a fade-in the
        patches are blended with their half-resolution version (nearest upsampling)."""
        factor = 2**self.level
        x = _pool(patches, factor)
        alpha = self.alpha
        if alpha < 1.0:
            x = alpha * x + (1.0 - alpha) * _upsample(_pool(x, 2), 2)
        return x, None if masks is None else _pool(masks, factor)

    def expand(self, x_hat: torch.Tensor) -> torch.Tensor:
        return _upsample(x_hat, 2**self.level)

    def discriminate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(x, self.level, self.alpha)

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The first encoder's code at the current resolution ``(B, L)`` (forest scorer features)."""
        return self.encoder(self.prepare(patches, None)[0], self.level, self.alpha)

    def reconstruct(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, C, r, r) -> z (B, L), x_hat (B, C, r, r), z_hat (B, L)`` at the current resolution ``r``."""
        level, alpha = self.level, self.alpha
        z = self.encoder(x, level, alpha)
        x_hat = self.decoder(self.condition(z, positions), level, alpha)
        return z, x_hat, self.second_encoder(x_hat, level, alpha)

    def training_step(
        self, patches: torch.Tensor, masks: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer],
        positions: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """GANomaly's step at the current resolution; then the fade-in advances by the batch."""
        losses = super().training_step(patches, masks, optimizers, positions=positions)
        if self.alpha < 1.0:
            self.stage_patches += len(patches)
        return {**losses, "stage": float(self.stage), "alpha": self.alpha}

    def validation_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        """GANomaly's (``w_con * con + w_enc * enc``) at the current resolution; during a
        fade-in ``FADE_IN_VALIDATION + patches left`` (module docstring)."""
        if self.alpha < 1.0:
            return FADE_IN_VALIDATION + float(self.config.fade_patches - int(self.stage_patches))
        return super().validation_loss(patches, masks, positions)

    def fit_statistics(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """GANomaly's median/MAD; warns when training ended before the last stage or mid-fade."""
        if not self.is_final_stage or self.alpha < 1.0:
            log.warning(
                "%s: training ended at %dx%d (stage %d of %d, alpha %.2f) before reaching the patch size %d; "
                "raise max_epochs or lower patience/fade_patches", self.name, self.resolution, self.resolution,
                int(self.stage) + 1, self.stages, self.alpha, self.config.patch_size,
            )
        super().fit_statistics(patches, masks, positions)
