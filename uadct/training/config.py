"""Training hyper-parameters (one dataclass, stored in every checkpoint's metadata)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Training hyper-parameters (defaults follow the papers where they say).

    ``batch_size`` is the global batch: under torchrun each of N processes trains on
    ``batch_size / N`` patches per step, so results do not depend on the GPU count.
    ``augment``: any of ``"flip"`` (horizontal flips, as the GANomaly papers) and
    ``"gmm"`` (GMM/PCA contrast augmentation, :mod:`uadct.augment`).
    ``workers``: DataLoader worker processes sampling patches (``None``: automatic,
    see :func:`default_workers`). ``amp``: bfloat16 autocast (``None``: on for CUDA).
    """

    model: str = "normative"  # the winner of the real-data benchmark (docs/benchmarks.md)
    patch_size: int = 16
    dims: int = 2
    batch_size: int = 128
    learning_rate: float = 1e-3
    max_epochs: int = 50
    patience: int = 10
    patches_per_epoch: int = 8192
    validation_patches: int = 2048
    validation_fraction: float = 0.2
    statistics_patches: int = 4096
    max_background: float = 0.5
    exclude_labels: str | None = None  # folder of <subject>.nii.gz lesion masks on each scan's own grid
    augment: tuple[str, ...] = ("flip",)
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    amp: bool | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    calibration_subjects: int = 4  # validation subjects scored whole for the healthy calibration (0: none)
    scorer: str = "model"  # "model" (its own scores) or "forest" (uadct.forest_scorer: a forest on latent features)
    forest_model: str = "random-forest"  # "random-forest" or "gradient-boosting"
    forest_trees: int = 100  # trees (boosting iterations) of the forest scorer
    forest_patches: int = 4096  # healthy training patches for the forest (and as many with synthetic anomalies)
    covariates: str | None = None  # participants TSV (uadct.covariates): the model is conditioned on subject covariates
    covariate_columns: tuple[str, ...] = ()  # the TSV's covariate columns (default: age and sex where present)


AUGMENTATIONS = ("flip", "gmm")

