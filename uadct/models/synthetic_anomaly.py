"""Self-supervised synthetic-anomaly segmentation (foreign patch interpolation family).

The family that won the MOOD challenges (FPI, Tan et al. 2020; PII, Tan et al. 2021;
NSA, Schlueter et al. 2022; Naval Marimont & Tarroni 2022): from healthy scans alone, a
small U-Net learns to segment synthetic anomalies blended into healthy patches. Each
training patch, with probability ``1 - clean_fraction``, gets one anomaly:

- a random irregular smooth shape: an ellipse/ellipsoid (log-uniform radius in
  ``radius_range`` voxels, random elongation and rotation) whose radius is warped by a
  smooth random field (``irregularity``) and whose edge is a sigmoid (soft edges);
- a blend factor ``alpha`` drawn from ``alpha_range`` inside the shape, kept inside the brain mask;
- content of one of three kinds: a **foreign patch** (another patch of the batch, from
  another place or subject), an **intensity shift** (hyper- or hypo-intense by
  ``shift_range``, textured by a smooth field) or a **constant** intensity;
- ``x' = x + a (content - x)`` with ``a`` the voxel's blend factor, and ``a`` itself is
  the target (BCE, optionally plus soft Dice), counted over brain voxels.

The voxel map is the predicted anomaly probability. There is no reconstruction, so
structures sharper than anything in training (sulci at a finer resolution) are not
anomalies by construction.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from uadct.errors import UadctError
from uadct.models.base import ModelConfig
from uadct.models.unet import UNetModel

ANOMALY_KINDS = ("foreign", "shift", "constant")


@dataclasses.dataclass
class SyntheticAnomalyConfig(ModelConfig):
    """U-Net size, the synthetic anomaly generator's ranges, and the loss mix."""

    base_channels: int = 16  # channels of the first U-Net level, doubled per level
    levels: int = 3  # poolings; patch_size must be divisible by 2**levels
    clean_fraction: float = 0.25  # share of training patches left without an anomaly
    radius_range: tuple[float, float] = (1.5, 12.0)  # anomaly radius in voxels (log-uniform)
    irregularity: float = 0.35  # strength of the smooth radial warp of the shape (0: ellipses)
    softness_range: tuple[float, float] = (0.05, 0.4)  # edge width as a fraction of the radius
    alpha_range: tuple[float, float] = (0.2, 1.0)  # blend factor inside the shape
    shift_range: tuple[float, float] = (0.15, 0.9)  # |intensity shift| of "shift" anomalies, hyper or hypo
    constant_range: tuple[float, float] = (0.0, 1.3)  # intensity of "constant" anomalies
    texture: float = 0.3  # relative smooth texture on shifted and constant content
    kinds: tuple[str, ...] = ANOMALY_KINDS  # anomaly contents drawn from: foreign, shift, constant
    dice_weight: float = 0.0  # weight of the soft Dice term added to the BCE


def _interpolation_mode(dims: int) -> str:
    return "bilinear" if dims == 2 else "trilinear"


def smooth_field(batch: int, spatial: tuple[int, ...], cells: int, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """``(batch, 1, *spatial)`` standard Gaussian values on a ``cells + 1`` lattice, interpolated (smooth, std <= 1)."""
    lattice = torch.randn((batch, 1) + (cells + 1,) * len(spatial), generator=generator, device=device)
    return F.interpolate(lattice, size=spatial, mode=_interpolation_mode(len(spatial)), align_corners=True)


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def anomaly_shapes(masks: torch.Tensor, config: SyntheticAnomalyConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft irregular shapes ``(B, 1, *patch)`` in [0, 1], each centred on a random brain voxel of its patch."""
    batch, spatial, device = masks.shape[0], tuple(masks.shape[2:]), masks.device
    dims = len(spatial)
    weights = masks.flatten(1).float() + 1e-6  # an empty mask falls back to a uniform centre
    flat_centre = torch.multinomial(weights, 1, generator=generator)[:, 0]
    centre = torch.stack(torch.unravel_index(flat_centre, spatial), dim=1).float()  # (B, dims)
    low, high = config.radius_range
    radius = torch.exp(_uniform((batch, 1), (math.log(low), math.log(high)), generator, device))
    radii = radius * torch.exp(_uniform((batch, dims), (-0.4, 0.4), generator, device))  # elongation per axis
    rotation, _ = torch.linalg.qr(torch.randn((batch, dims, dims), generator=generator, device=device))
    axes = torch.meshgrid(*[torch.arange(s, device=device, dtype=torch.float32) for s in spatial], indexing="ij")
    offsets = torch.stack([a.reshape(-1) for a in axes])[None] - centre[:, :, None]  # (B, dims, N)
    local = torch.einsum("bji,bjn->bin", rotation, offsets) / radii[:, :, None]
    distance = local.square().sum(1).sqrt().view((batch, 1) + spatial)
    warp = smooth_field(batch, spatial, 4, generator, device)
    distance = distance * torch.exp(config.irregularity * warp)
    softness = _uniform((batch,) + (1,) * (dims + 1), config.softness_range, generator, device)
    return torch.sigmoid((1.0 - distance) / softness)


def blend_synthetic_anomalies(
    patches: torch.Tensor, masks: torch.Tensor, config: SyntheticAnomalyConfig, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(corrupted, target)``, both ``(B, 1, *patch)``: ``corrupted = x + a (content - x)``, ``target = a``.

    ``a`` = blend factor x soft shape x brain mask (0 for the ``clean_fraction`` of patches
    left healthy); the content kind is drawn per patch from ``config.kinds``.
    The foreign content of patch ``i`` is patch ``i - 1`` of the batch (another place, often another subject).
    """
    x = patches.float()
    batch, spatial, device = x.shape[0], tuple(x.shape[2:]), x.device
    column = (batch,) + (1,) * (len(spatial) + 1)
    alpha = _uniform(column, config.alpha_range, generator, device)
    anomalous = (torch.rand(column, generator=generator, device=device) >= config.clean_fraction).float()
    blend = alpha * anomalous * anomaly_shapes(masks, config, generator) * (masks > 0).float()
    allowed = torch.tensor([ANOMALY_KINDS.index(k) for k in config.kinds], device=device)
    kind = allowed[torch.randint(0, len(allowed), column, generator=generator, device=device)]
    texture = 1.0 + config.texture * smooth_field(batch, spatial, 8, generator, device)
    sign = torch.where(torch.rand(column, generator=generator, device=device) < 0.5, -1.0, 1.0)
    shifted = x + sign * _uniform(column, config.shift_range, generator, device) * texture
    constant = _uniform(column, config.constant_range, generator, device) * texture
    foreign = x.roll(1, dims=0)
    content = torch.where(kind == 0, foreign, torch.where(kind == 1, shifted, constant))
    return x + blend * (content - x), blend


def masked_bce(logits: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy (soft targets) over the voxels where ``masks`` > 0."""
    weights = (masks > 0).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (loss * weights).sum() / weights.sum().clamp_min(1.0)


def soft_dice_loss(probability: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` over the batch's brain voxels."""
    weights = (masks > 0).float()
    overlap = (probability * target * weights).sum()
    return 1.0 - (2.0 * overlap + smooth) / ((probability * weights).sum() + (target * weights).sum() + smooth)


class SyntheticAnomalySegmentation(UNetModel):
    """U-Net segmenting synthetic anomalies; voxel map = anomaly probability."""

    name = "synthetic-anomaly"
    summary = "U-Net trained to segment synthetic anomalies blended into healthy patches; map = anomaly probability"
    outputs = ("voxel", "scalar")
    Config = SyntheticAnomalyConfig

    def __init__(self, config: SyntheticAnomalyConfig) -> None:
        super().__init__(config, out_channels=1)
        for field in ("radius_range", "softness_range", "alpha_range", "shift_range", "constant_range"):
            low, high = getattr(config, field)
            if not 0 <= low <= high or (field in ("radius_range", "softness_range") and low <= 0):
                raise UadctError(f"{self.name}: {field} must be 0 < low <= high, got ({low}, {high})")
        if not config.kinds or set(config.kinds) - set(ANOMALY_KINDS):
            raise UadctError(f"{self.name}: kinds must be some of {', '.join(ANOMALY_KINDS)}, got {tuple(config.kinds)}")
        if not 0 <= config.clean_fraction < 1:
            raise UadctError(f"{self.name}: clean_fraction must be in [0, 1), got {config.clean_fraction}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly logits ``(B, 1, *patch)``."""
        return self.unet(x)

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """BCE (+ ``dice_weight`` x soft Dice) between the predicted and the true blend factor, over brain voxels."""
        with torch.no_grad():
            corrupted, target = blend_synthetic_anomalies(patches, masks, self.config, generator)
        logits = self(corrupted).float()
        bce = masked_bce(logits, target, masks)
        losses = {"bce": bce, "loss": bce}
        if self.config.dice_weight > 0:
            dice = soft_dice_loss(torch.sigmoid(logits), target, masks)
            losses.update(dice=dice, loss=bce + self.config.dice_weight * dice)
        return losses

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``"voxel"``: anomaly probability ``(B, *patch)`` (0 outside ``masks``); ``"scalar"``: its mean ``(B,)``."""
        return self.voxel_scores(torch.sigmoid(self(patches).float()), masks)
