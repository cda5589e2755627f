"""Fit a healthy calibration: score whole healthy subjects as `uadct score` would, pool their brain voxels.

Used at the end of training (the held-out validation subjects) and by `uadct calibrate`
(any healthy prepared subjects, any scoring settings). The result goes into the
checkpoint's metadata (:data:`uadct.calibration.CALIBRATION_KEY`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from uadct.calibration import CALIBRATION_KEY, Calibration, calibration_settings, fit_calibration
from uadct.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from uadct.covariates import CovariateSource, calibration_source
from uadct.errors import UadctError
from uadct.postprocess import PostProcess, postprocess_map

log = logging.getLogger(__name__)


def calibrate_volumes(
    checkpoint: Checkpoint,
    volumes: Iterable[tuple[str, np.ndarray, np.ndarray]],
    spacing_mm: tuple[float, float, float],
    stride: int = 4,
    gaussian_sigma: float | None = None,
    output_kind: str | None = None,
    postprocess: PostProcess | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    covariates: CovariateSource | None = None,
) -> Calibration:
    """Score every ``(subject, image, mask)`` volume on the atlas grid (``spacing_mm`` in numpy
    axis order), post-process the map, and fit the calibration of the pooled brain voxels.

    ``mask`` > 0 is brain; voxels where ``mask`` is 2 or more (a known lesion) are left out.
    ``covariates``: where each subject's covariates come from, for a model conditioned on them.
    """
    from uadct.calibration import resolve_output_kind
    from uadct.inference import Inferer

    postprocess = postprocess or PostProcess()
    kind = resolve_output_kind(checkpoint.model, output_kind)
    settings = calibration_settings(stride, gaussian_sigma, kind, postprocess.map_settings())
    inferer = Inferer(checkpoint, stride, batch_size, device, gaussian_sigma, kind, covariates=covariates)
    samples, names = [], []
    volumes = list(volumes)
    for index, (name, image, mask) in enumerate(volumes):
        brain = (np.asarray(mask) > 0).astype(np.uint8)
        inferer.use_subject(name)
        anomaly_map = inferer(np.asarray(image, dtype=np.float32), brain)
        anomaly_map, kept = postprocess_map(anomaly_map, brain, spacing_mm, postprocess)
        keep = (kept > 0) & (np.asarray(mask) < 2)
        samples.append(anomaly_map[keep])
        names.append(name)
        log.info("calibration: %s scored (%d brain voxels)", name, int(keep.sum()))
        if progress is not None:
            progress(index + 1, len(volumes))
    if not samples:
        raise UadctError("calibration needs at least one healthy subject")
    return fit_calibration(samples, names, settings)


def with_calibration(metadata: dict[str, Any], calibration: Calibration) -> dict[str, Any]:
    """``metadata`` whose calibration list holds ``calibration`` (replacing one with the same settings)."""
    kept = [c for c in metadata.get(CALIBRATION_KEY) or [] if c.get("settings") != calibration.settings]
    return {**metadata, CALIBRATION_KEY: kept + [calibration.to_dict()]}


def calibrate_checkpoint(
    checkpoint_path: str | Path,
    subject_dirs: list[Path],
    out_path: str | Path,
    stride: int = 4,
    gaussian_sigma: float | None = None,
    output_kind: str | None = None,
    postprocess: PostProcess | None = None,
    device: str = "auto",
    exclude_labels: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    covariates: str | Path | None = None,
) -> tuple[Path, Calibration]:
    """Calibrate a checkpoint on healthy prepared subjects and write it to ``out_path``
    (may be the same file). ``exclude_labels``: folder of ``<subject>.nii.gz`` lesion masks
    whose voxels are left out. ``covariates``: participants TSV with the subjects' rows, for
    a model trained with covariates (required for one, refused for any other)."""
    checkpoint = load_checkpoint(checkpoint_path)
    source = calibration_source(checkpoint.metadata, covariates, checkpoint_path)
    volumes, spacing = prepared_volumes(subject_dirs, exclude_labels, checkpoint)
    calibration = calibrate_volumes(checkpoint, volumes, spacing, stride, gaussian_sigma, output_kind, postprocess,
                                     device, progress=progress, covariates=source)
    save_checkpoint(out_path, checkpoint.model, _without_model_keys(with_calibration(checkpoint.metadata, calibration)),
                    checkpoint.extra_state)
    return Path(out_path), calibration


def _without_model_keys(metadata: dict[str, Any]) -> dict[str, Any]:
    """save_checkpoint adds the model name and config itself."""
    return {k: v for k, v in metadata.items() if k not in ("model", "model_config")}


def prepared_volumes(subject_dirs: list[Path], exclude_labels: str | Path | None = None,
                     checkpoint: Checkpoint | None = None) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], tuple[float, float, float]]:
    """``(subject, image, mask)`` atlas-grid arrays of prepared subjects (mask 2 on known lesions
    from ``exclude_labels``) and the grid's spacing in numpy axis order. With ``checkpoint``,
    each subject must have been prepared as the model expects."""
    import SimpleITK as sitk

    from uadct.preprocess.prepared import load_prepared
    from uadct.inference import _check_compatible
    from uadct.training.data import _lesion_on_atlas_grid

    if not subject_dirs:
        raise UadctError("no prepared subjects to calibrate on")
    volumes: list[tuple[str, np.ndarray, np.ndarray]] = []
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    for folder in subject_dirs:
        prepared = load_prepared(folder)
        if checkpoint is not None:
            _check_compatible(checkpoint, prepared.sidecar.get("config", {}), Path(folder))
        mask = (sitk.GetArrayFromImage(prepared.mask) > 0).astype(np.uint8)
        if exclude_labels is not None:
            lesion = _lesion_on_atlas_grid(prepared, exclude_labels)
            if lesion is not None:
                mask[lesion & (mask > 0)] = 2
        volumes.append((prepared.subject, sitk.GetArrayFromImage(prepared.image), mask))
        spacing = tuple(float(v) for v in prepared.image.GetSpacing()[::-1])  # type: ignore[assignment]
    return volumes, spacing


def calibrate_trained_model(model: Any, patch: dict[str, int], subject_dirs: list[Path],
                            exclude_labels: str | Path | None, device: str,
                            covariates: CovariateSource | None = None) -> Calibration:
    """The calibration of a just-trained model on its held-out validation subjects (default scoring settings);
    ``covariates``: the training run's table and encoding, for a model conditioned on them."""
    volumes, spacing = prepared_volumes(subject_dirs, exclude_labels)
    return calibrate_volumes(Checkpoint(model, {"patch": patch}), volumes, spacing, device=device, covariates=covariates)
