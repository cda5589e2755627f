"""Fitting voxel-wise models (``normative``) from whole prepared volumes.

The patch engine (:mod:`uadct.training`) calls :func:`fit_volume_model` after its (empty)
loop for models that have ``fit_volumes``: the training subjects' volumes (known lesions
removed from their masks with ``--exclude-labels``) fit the model, and the validation
subjects' maps give the checkpoint's ``score_scale`` (a robust maximum of healthy scores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from uadct.errors import UadctError

SCORE_SCALE_QUANTILE = 0.999


def usable_mask(folder: Path, mask: np.ndarray, exclude_labels: str | Path | None) -> np.ndarray:
    """The subject's brain mask on the atlas grid without its known lesion (if ``exclude_labels`` has one)."""
    brain = np.asarray(mask) > 0
    if exclude_labels:
        from uadct.preprocess.prepared import load_prepared
        from uadct.training.data import _lesion_on_atlas_grid

        lesion = _lesion_on_atlas_grid(load_prepared(folder), exclude_labels)
        if lesion is not None:
            brain = brain & ~lesion
    return brain


def atlas_reference(folder: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The atlas brain the subject was registered to, as an array, when it lies on the prepared grid."""
    import SimpleITK as sitk

    from uadct.atlas import load_atlas
    from uadct.preprocess.config import PreprocessConfig
    from uadct.preprocess.prepared import load_prepared

    try:
        config = PreprocessConfig.from_dict(load_prepared(folder).sidecar.get("config", {}))
        brain = sitk.GetArrayFromImage(load_atlas(config.atlas).brain)
    except UadctError:
        return None
    return brain if brain.shape == tuple(shape) else None


def fit_volume_model(model: Any, train_volumes: Sequence[Any], val_volumes: Sequence[Any], train_dirs: Sequence[Path],
                     val_dirs: Sequence[Path], exclude_labels: str | Path | None) -> float | None:
    """Fit ``model.fit_volumes`` on the training subjects (and the validation ones when the model's
    ``fit_validation`` option is on); return the ``score_scale`` quantile of validation brain scores."""
    fit_validation = bool(getattr(model.config, "fit_validation", False))
    pairs = list(zip(train_volumes, train_dirs)) + (list(zip(val_volumes, val_dirs)) if fit_validation else [])
    if not pairs:
        raise UadctError("no training subject for the voxel-wise model")
    model.fit_volumes([np.asarray(v.image) for v, _ in pairs],
                      [usable_mask(Path(d), v.mask, exclude_labels) for v, d in pairs],
                      reference=atlas_reference(Path(pairs[0][1]), np.asarray(pairs[0][0].image).shape))
    values = []
    for volume, folder in zip(val_volumes, val_dirs):
        brain = usable_mask(Path(folder), volume.mask, exclude_labels)
        values.append(model.score_volume(np.asarray(volume.image), np.asarray(volume.mask))[brain])
    flat = np.concatenate(values) if values else np.zeros(0)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return None
    scale = float(np.quantile(flat, SCORE_SCALE_QUANTILE))
    return scale if scale > 0 else None
