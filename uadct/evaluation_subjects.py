"""The inputs of an evaluation: maps, labels and brain masks by subject id, one subject's voxels, a validation report.

:func:`load_subject` reads one subject's map (with its score sidecar), label and brain mask,
checks that they share the map's grid, applies the median filter and keeps the brain's
bounding box and its sorted lesion and normal voxel scores (:class:`EvaluatedSubject`);
:func:`read_validation` reads the thresholds of an earlier ``metrics.json``.
:mod:`uadct.evaluate` measures them (the protocol is described there).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uadct.arrays import bounding_box, top_k_mean
from uadct.errors import InputError
from uadct.io import grid_difference, list_niftis, read_image, read_mask, same_grid, strip_nifti_suffix
from uadct.scoremap import ScoreSidecar

log = logging.getLogger(__name__)

SLICE_TOP_FRACTION = 0.05  # a slice's score: mean of its top 5 % brain voxels


@dataclass
class EvaluatedSubject:
    """One subject's brain region, cropped to its bounding box (``(d, h, w)`` arrays)."""

    subject: str
    scores: np.ndarray  # float32 map values (after the median filter)
    brain: np.ndarray  # bool
    lesion: np.ndarray  # bool, inside the brain only
    positives: np.ndarray  # (P,) sorted scores of lesion voxels
    negatives: np.ndarray  # (N,) sorted scores of normal voxels
    image_score: float
    image_score_source: str
    slice_scores: np.ndarray | None = None  # (S,) axial slices holding brain voxels (image_level="slice")
    slice_abnormal: np.ndarray | None = None  # (S,) bool


def niftis_by_subject(folder: Path) -> dict[str, Path]:
    """Subject id -> NIfTI file in ``folder`` (else its 2D PNG/TIFF/DICOM files); two files with the same id are an error."""
    from uadct.images2d import list_images_2d

    found: dict[str, Path] = {}
    for path in list_niftis(folder) or list_images_2d(folder):
        subject = strip_nifti_suffix(path)
        if subject in found:
            raise InputError(f"{path}: same subject id {subject!r} as {found[subject]}; keep one of the two")
        found[subject] = path
    return found


def load_subject(
    subject: str, map_path: Path, label_path: Path | None, mask_path: Path | None,
    median_filter: int = 0, image_top_k: int = 1000, slices: bool = False,
) -> EvaluatedSubject:
    """Read one subject's map, label and mask, check the grids, filter and crop to the brain.

    ``median_filter``: the 3D median filter size (0 or 1: off); ``image_top_k``: voxels
    averaged for the image score when the map has no sidecar; ``slices``: also measure the
    axial slices (``image_level="slice"``).
    """
    map_image = read_image(map_path, allow_empty=True)
    scores_volume = sitk.GetArrayFromImage(map_image).astype(np.float32, copy=False)
    if label_path is not None:
        label_image = read_mask(label_path)
        if not same_grid(label_image, map_image):
            raise InputError(
                f"{label_path}: the label is not on the grid of its map {map_path} "
                f"({grid_difference(label_image, map_image)})"
            )
        lesion_volume = sitk.GetArrayViewFromImage(label_image) != 0
    else:
        lesion_volume = np.zeros(scores_volume.shape, dtype=bool)
    if mask_path is not None:
        mask_image = read_mask(mask_path, reference=map_image)
        brain = sitk.GetArrayViewFromImage(mask_image) != 0
        if not brain.any():
            raise InputError(f"{mask_path}: the brain mask is empty")
        outside = int(np.count_nonzero(lesion_volume & ~brain))
        if outside:
            log.warning(
                "%s: %d lesion voxel(s) lie outside the brain mask %s and are not counted", label_path, outside, mask_path
            )
    else:
        if label_path is not None and not scores_volume.any():  # the "brain" would be the label alone: a false perfect score
            raise InputError(f"{map_path}: the map is all zero, so without --brain-masks there is no brain region to evaluate "
                             "(only the label's voxels would be scored); give --brain-masks")
        brain = (scores_volume != 0) | lesion_volume
        if not brain.any():
            where = f"its label {label_path} is empty" if label_path is not None else "it has no label"
            raise InputError(f"{map_path}: the map is all zero and {where}, so there is no brain region to evaluate")

    box = bounding_box(brain, margin=median_filter // 2)
    scores = np.ascontiguousarray(scores_volume[box])
    brain_crop = np.ascontiguousarray(brain[box])
    lesion = np.ascontiguousarray(lesion_volume[box]) & brain_crop
    if not np.isfinite(scores[brain_crop]).all():
        raise InputError(f"{map_path}: the map holds NaN or infinite values inside the brain")

    sidecar = ScoreSidecar.read(map_path)
    if sidecar is not None and sidecar.image_score is not None:
        image_score, source = sidecar.image_score, "sidecar"
    else:
        image_score = top_k_mean(scores[brain_crop], image_top_k)
        source = f"top-{image_top_k} mean"

    slice_scores = slice_abnormal = None
    if slices:
        slice_scores, slice_abnormal = slice_samples(scores, brain_crop, lesion, axial_axis(map_image))

    if median_filter > 1:
        from scipy import ndimage

        scores = np.where(brain_crop, scores, np.float32(0.0))
        scores = ndimage.median_filter(scores, size=median_filter, mode="constant", cval=0.0)
    positives = np.sort(scores[lesion])
    negatives = np.sort(scores[brain_crop & ~lesion])
    return EvaluatedSubject(subject, scores, brain_crop, lesion, positives, negatives, image_score, source, slice_scores, slice_abnormal)


def axial_axis(image: sitk.Image) -> int:
    """The numpy array axis of ``image`` closest to the superior-inferior direction."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    index_axis = int(np.argmax(np.abs(direction[2])))  # image index axis with the largest z component
    return 2 - index_axis  # numpy arrays are (z, y, x) in index order


def slice_samples(
    scores: np.ndarray, brain: np.ndarray, lesion: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """(S,) slice scores (mean of the top 5 % brain voxels) and (S,) lesion flags of slices along ``axis``."""
    slice_scores, abnormal = [], []
    for index in range(scores.shape[axis]):
        inside = np.take(brain, index, axis=axis)
        if not inside.any():
            continue
        values = np.take(scores, index, axis=axis)[inside]
        slice_scores.append(top_k_mean(values, max(1, int(round(SLICE_TOP_FRACTION * values.size)))))
        abnormal.append(bool(np.take(lesion, index, axis=axis).any()))
    return np.array(slice_scores), np.array(abnormal, dtype=bool)


def read_validation(path: Path) -> dict[str, float | None]:
    """The image and voxel thresholds stored in an earlier run's ``metrics.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        pooled = data["pooled"]
        image = pooled["image_level"]["f1_optimal_threshold"]
        unit = pooled["image_level"].get("unit", "subject")
        voxel = pooled.get("best_dice_threshold")
    except FileNotFoundError:
        raise InputError(f"{path}: no such validation report (give the metrics.json of `uadct evaluate`)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a metrics.json written by `uadct evaluate` ({type(exc).__name__}: {exc})") from None
    if image is None:
        raise InputError(f"{path}: holds no image-level threshold (its set had no abnormal subject)")
    return {"image_threshold": float(image), "image_unit": unit, "voxel_threshold": None if voxel is None else float(voxel)}
