"""Intensity thresholding: the no-learning baseline.

The voxel map is the normalised intensity itself (``"intensity"``; hyper-intense lesions
such as white-matter hyper-intensities on FLAIR stand out), or its robust deviation from
the training brain voxels: ``"deviation"`` = |x - median| / MAD, ``"upper"`` =
max(0, x - median) / MAD (bright lesions only). Median and MAD (median absolute
deviation, unscaled) are fitted once by ``fit_statistics`` and kept as buffers.
"""

from __future__ import annotations

import dataclasses

import torch

from uadct.errors import UadctError
from uadct.models.base import ModelConfig, NonTrainableModel, median_and_mad

THRESHOLD_MODES = ("intensity", "deviation", "upper")
MINIMUM_MAD = 1e-6  # intensity units; guards a constant training sample


@dataclasses.dataclass
class ThresholdConfig(ModelConfig):
    """Threshold settings: which voxel map to produce (one of THRESHOLD_MODES)."""

    mode: str = "intensity"  # voxel map: "intensity", "deviation" (|x - median| / MAD) or "upper" (bright only)


class IntensityThreshold(NonTrainableModel):
    name = "threshold"
    summary = "no learning; voxel map = intensity, or its deviation from the training median in MADs"
    outputs = ("voxel",)
    Config = ThresholdConfig

    def __init__(self, config: ThresholdConfig) -> None:
        if config.mode not in THRESHOLD_MODES:
            raise UadctError(f"threshold: unknown mode {config.mode!r}; expected one of {', '.join(THRESHOLD_MODES)}")
        super().__init__(config)
        self.register_buffer("median", torch.tensor(0.0))
        self.register_buffer("mad", torch.tensor(1.0))

    def fit_statistics(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Median and MAD of the brain voxels (``masks > 0``) of ``(N, 1, *patch)`` training patches."""
        values = patches[masks > 0].float().cpu()  # kthvalue is not on every accelerator
        centre, mad = median_and_mad(values[:, None])
        self.median.copy_(centre[0])
        self.mad.copy_(mad[0].clamp_min(MINIMUM_MAD))
        self.fitted.fill_(True)

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``"voxel"`` ``(B, *patch)``: intensity, |x - median| / MAD, or max(0, x - median) / MAD."""
        if self.config.mode == "intensity":
            voxel = patches
        else:
            self._require_fitted()
            deviation = (patches - self.median) / self.mad
            voxel = deviation.abs() if self.config.mode == "deviation" else deviation.clamp_min(0.0)
        if masks is not None:
            voxel = voxel * masks
        return {"voxel": voxel[:, 0]}
