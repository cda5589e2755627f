"""Evaluate a folder of anomaly maps against lesion labels: voxel, lesion and image level.

Subjects are matched by file name (``<id>.nii.gz`` or ``<id>.nii``) between the maps
folder and the labels folder. Each subject's metrics are measured over its brain
voxels: the brain mask ``<brain_masks_dir>/<id>.nii[.gz]`` when a folder is given,
otherwise the voxels where the map is nonzero or the label is set (maps have their
background set to 0 when scored). Labels (and masks) must lie on their map's grid.

What is measured (every threshold ``t`` calls a voxel anomalous when ``score >= t``):

- **Voxel level**, per subject and pooled (all subjects' brain voxels as one sample):
  AUROC, AUPRC, best Dice with its threshold, and for each false-positive rate ``f`` in
  ``options.fprs`` the lowest threshold flagging at most a fraction ``f`` of the normal
  brain voxels, with the Dice there. A subject's own thresholds come from its own voxels;
  the pooled ones from the pooled voxels (one threshold for the whole cohort).
- **Post-processing** (optional, as in the comparative studies of Baur et al.):
  ``median_filter`` (a 3D median of that many voxels per side) smooths the map before
  *everything*; the filter runs over the brain's bounding box with voxels outside the
  brain at 0 and only brain voxels are kept. ``min_component_size`` applies to
  *binarised* maps only: after thresholding, 26-connected predicted clusters smaller
  than that are removed before any Dice at a threshold and before lesion counting. The
  thresholds themselves (best Dice, fixed FPR) are chosen on the continuous map, so
  ``best_dice`` stays the exact maximum before removal and ``dice_cc_at_best_threshold``
  is the Dice at that threshold after removal.
- **Lesion level**, at one voxel threshold for the cohort (``options.threshold``, else the
  pooled best-Dice threshold of the ``threshold_from`` validation report, else this set's
  pooled best-Dice threshold, which is optimistic): lesions are the 26-connected
  components of the label inside the brain; one is detected when the binarised map covers
  at least ``max(1, lesion_overlap * size)`` of its voxels; predicted clusters touching no
  lesion are false-positive clusters.
- **Image level**: a subject's image score is the ``image_score`` of the map's sidecar
  JSON (``<id>.json`` next to the map, written by ``uadct score``), else the mean of the
  top ``image_top_k`` map voxels inside the brain. A subject is *abnormal* when its label
  has at least one lesion voxel inside the brain; subjects with an empty label are normal,
  and with ``unlabelled_are_normal`` so are maps without a label file (they then count in
  every metric as subjects without lesions). AUROC over subjects, the F1-optimal threshold
  on this set, and accuracy, sensitivity, specificity, precision and F1 at the threshold
  read from ``threshold_from`` (the ``metrics.json`` of an earlier run on a validation
  set) or, without it, at this set's F1-optimal threshold (flagged optimistic). With
  ``image_level="slice"`` the samples are the axial slices (the array axis closest to
  superior-inferior) holding brain voxels instead: a slice's score is the mean of its top
  ``SLICE_TOP_FRACTION`` (5 %) brain voxels of the map as read, and it is abnormal when it
  holds a lesion voxel; AUROC and thresholds then pool the slices of all subjects.
- **Bootstrap** percentile intervals (``bootstrap`` resamples of the subjects, seeded)
  for the means over subjects, the pooled Dice at the pooled fixed-FPR thresholds and
  the pooled detection rate (thresholds held fixed), and the image-level AUROC. The pooled
  voxel AUROC/AUPRC/best Dice get none (a resample would need every voxel again).

A subject that cannot be read (unreadable file, another grid, empty mask) is left out and
listed in ``EvaluationResult.failed``; when none is left :class:`InputError` is raised.

Outputs in ``out_dir`` (written atomically, replacing earlier ones): ``metrics.json``
(per subject, pooled, options, inputs), ``metrics.csv`` (one row per subject),
``report.md``, and the plots ``roc.png``, ``pr.png`` (pooled curve and one thin line per
subject) and ``image_roc.png`` (when both normal and abnormal subjects are present);
:mod:`uadct.evaluation_report` lays them out. :mod:`uadct.evaluation_subjects` reads the
files (maps, labels, masks, sidecars, a validation report); this module measures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uadct import __version__
from uadct.errors import InputError, UadctError
from uadct.evaluation_report import fpr_key, write_report
from uadct.evaluation_subjects import SLICE_TOP_FRACTION, EvaluatedSubject, load_subject, niftis_by_subject, read_validation  # noqa: F401
from uadct.metrics import (
    IMAGE_METRIC_FIELDS,
    auprc,
    auroc,
    bootstrap_auroc,
    bootstrap_mean,
    bootstrap_ratio,
    bootstrap_weights,
    classification_metrics,
    counts_at_threshold,
    curve_points,
    dice_from_counts,
    f1_optimal_threshold,
    lesion_detection,
    percentile_interval,
    remove_small_components,
    threshold_at_fpr,
    voxel_metrics_from_groups,
)

log = logging.getLogger(__name__)

IMAGE_LEVELS = ("subject", "slice")

ProgressCallback = Callable[[int, int, str], None]
"""Called after each subject with (subjects done, subjects to do, subject id)."""


@dataclass
class EvaluationOptions:
    """How :func:`evaluate_folder` scores the maps (see the module docstring for the rules).

    ``fprs``: voxel false-positive rates for the fixed-FPR operating points (fractions);
    ``median_filter``: median filter size in voxels (0 or 1: off); ``min_component_size``:
    predicted clusters smaller than this many voxels are removed after thresholding (0 or
    1: off); ``threshold``: voxel threshold for the lesion level (None: see module doc);
    ``lesion_overlap``: fraction of a lesion's voxels that must be flagged to detect it
    (0: one voxel is enough); ``image_top_k``: voxels averaged for an image score when no
    sidecar gives one; ``unlabelled_are_normal``: maps without a label file are normal
    subjects instead of being skipped; ``threshold_from``: ``metrics.json`` of a validation
    run whose image threshold (and voxel threshold) are applied; ``bootstrap``: resamples
    (0: no intervals); ``confidence``: interval coverage; ``seed``: bootstrap seed;
    ``plots``: write the ROC/PR PNGs; ``image_level``: ``"subject"`` or ``"slice"`` (axial
    slices as the samples of the image-level metrics).
    """

    fprs: tuple[float, ...] = (0.01, 0.05)
    median_filter: int = 0
    min_component_size: int = 0
    threshold: float | None = None
    lesion_overlap: float = 0.0
    image_top_k: int = 1000
    unlabelled_are_normal: bool = False
    threshold_from: Path | None = None
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    plots: bool = True
    image_level: str = "subject"

    def __post_init__(self) -> None:
        self.fprs = tuple(float(f) for f in self.fprs)
        for fpr in self.fprs:
            if not 0.0 < fpr < 1.0:
                raise UadctError(f"a false-positive rate must lie strictly between 0 and 1, got {fpr!r}")
        for name in ("median_filter", "min_component_size", "image_top_k", "bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise UadctError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.image_top_k < 1:
            raise UadctError(f"image_top_k must be >= 1, got {self.image_top_k!r}")
        if not 0.0 <= self.lesion_overlap <= 1.0:
            raise UadctError(f"lesion_overlap must lie in [0, 1], got {self.lesion_overlap!r}")
        if not 0.0 < self.confidence < 1.0:
            raise UadctError(f"confidence must lie strictly between 0 and 1, got {self.confidence!r}")
        if self.image_level not in IMAGE_LEVELS:
            raise UadctError(f"image_level must be one of {', '.join(IMAGE_LEVELS)}, got {self.image_level!r}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise UadctError(f"threshold must be a finite number, got {self.threshold!r}")


@dataclass
class EvaluationResult:
    """What :func:`evaluate_folder` measured and wrote.

    ``per_subject``: one dict per evaluated subject (``subject``, ``abnormal``,
    ``image_score``, voxel metrics, fixed-FPR Dice and thresholds, lesion counts), sorted
    by id; ``pooled``: the pooled voxel metrics plus ``lesion``, ``mean_over_subjects``,
    ``image_level`` and ``confidence_intervals`` dicts; ``files``: kind -> written path;
    ``missing``: ids of maps that have no label (skipped); ``failed``: (id, message) of
    subjects left out because of a problem with their files.
    """

    per_subject: list[dict]
    pooled: dict
    files: dict[str, Path]
    missing: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def evaluate_folder(
    maps_dir: str | Path,
    labels_dir: str | Path,
    out_dir: str | Path,
    brain_masks_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    options: EvaluationOptions | None = None,
) -> EvaluationResult:
    """Measure every map in ``maps_dir`` against its label; write the report to ``out_dir``.

    Each volume is read once. Memory holds, per subject, its brain bounding box (6 bytes
    per voxel) and its sorted brain-voxel scores (4 bytes per voxel): about 100 MB per
    1 mm subject, 12 MB at 2 mm. Raises :class:`InputError` naming the folder or file
    when a folder has no NIfTI files, no map has a label, a mask is missing, the
    validation report is unusable, or no subject could be evaluated.
    """
    options = options or EvaluationOptions()
    maps_dir, labels_dir, out_dir = Path(maps_dir), Path(labels_dir), Path(out_dir)
    masks_dir = Path(brain_masks_dir) if brain_masks_dir is not None else None
    validation = read_validation(options.threshold_from) if options.threshold_from is not None else None

    maps = niftis_by_subject(maps_dir)
    labels = niftis_by_subject(labels_dir)
    masks = niftis_by_subject(masks_dir) if masks_dir is not None else {}
    if not maps:
        raise InputError(f"{maps_dir}: no anomaly maps (.nii or .nii.gz files) found")
    without_label = sorted(set(maps) - set(labels))
    subjects = sorted(maps) if options.unlabelled_are_normal else sorted(set(maps) & set(labels))
    missing = [] if options.unlabelled_are_normal else without_label
    unused_labels = sorted(set(labels) - set(maps))
    if not subjects:
        raise InputError(
            f"no anomaly map in {maps_dir} has a label of the same name in {labels_dir} "
            f"(maps: {_preview(sorted(maps))}; labels: {_preview(sorted(labels))})"
        )
    if missing:
        log.warning(
            "%d map(s) in %s have no label in %s, skipped: %s", len(missing), maps_dir, labels_dir, _preview(missing)
        )
    if unused_labels:
        log.info("%d label(s) in %s have no map, ignored: %s", len(unused_labels), labels_dir, _preview(unused_labels))
    if masks_dir is not None:
        without_mask = [s for s in subjects if s not in masks]
        if without_mask:
            raise InputError(
                f"{masks_dir}: no brain mask for {len(without_mask)} subject(s): {_preview(without_mask)} "
                f"(expected <subject>.nii.gz or <subject>.nii)"
            )

    loaded: list[EvaluatedSubject] = []
    inputs: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    for done, subject in enumerate(subjects, start=1):
        try:
            loaded.append(load_subject(subject, maps[subject], labels.get(subject), masks.get(subject), options.median_filter,
                                       options.image_top_k, options.image_level == "slice"))
        except InputError as exc:
            log.warning("%s: left out: %s", subject, exc)
            failed.append((subject, str(exc)))
        else:
            inputs.append(
                {
                    "subject": subject,
                    "map": str(maps[subject]),
                    "label": str(labels[subject]) if subject in labels else None,
                    "brain_mask": str(masks[subject]) if subject in masks else None,
                    "image_score_source": loaded[-1].image_score_source,
                }
            )
        if progress is not None:
            progress(done, len(subjects), subject)
    if not loaded:
        if len(failed) == 1:
            raise InputError(failed[0][1])
        raise InputError(f"{maps_dir}: none of the {len(failed)} subject(s) could be evaluated; first: {failed[0][1]}")

    per_subject = [_subject_metrics(s, options) for s in loaded]
    pooled, curves = _pooled(loaded, per_subject, options, validation)
    log.info(
        "evaluated %d subject(s): pooled AUROC %.4f, AUPRC %.4f, best Dice %.4f",
        len(loaded), pooled["auroc"], pooled["auprc"], pooled["best_dice"],
    )

    description = {
        "maps_dir": str(maps_dir),
        "labels_dir": str(labels_dir),
        "brain_masks_dir": str(masks_dir) if masks_dir is not None else None,
        "brain_region": _brain_region_text(masks_dir),
        "threshold_rule": "a voxel (or image) is called anomalous when its score >= threshold",
        "subjects": inputs,
        "maps_without_label": without_label,
        "labels_without_map": unused_labels,
        "failed": [{"subject": s, "error": e} for s, e in failed],
        "uadct_version": __version__,
    }
    settings = {**asdict(options), "threshold_from": str(options.threshold_from) if options.threshold_from else None}
    files = write_report(out_dir, per_subject, pooled, description, settings, options, curves)
    return EvaluationResult(per_subject=per_subject, pooled=pooled, files=files, missing=missing, failed=failed)


# ----------------------------------------------------------------------------- metrics
def _constant(positives: np.ndarray, negatives: np.ndarray) -> bool:
    """True when every brain voxel of a subject has the same score (the map carries no information)."""
    values = [group for group in (positives, negatives) if group.size]
    if not values:
        return True
    low = min(float(group[0]) for group in values)  # groups are sorted ascending
    high = max(float(group[-1]) for group in values)
    return low == high


def degenerate_flags(n_flagged: int, n_brain: int) -> str | None:
    """``"everything"`` / ``"nothing"`` when a threshold flags every / no brain voxel, else None."""
    if n_brain and n_flagged >= n_brain:
        return "everything"
    if n_flagged == 0:
        return "nothing"
    return None


def _binarised(s: EvaluatedSubject, threshold: float, min_size: int) -> np.ndarray:
    """The subject's brain voxels with ``score >= threshold``, small clusters removed."""
    predicted = (s.scores >= threshold) & s.brain
    return remove_small_components(predicted, min_size) if min_size > 1 else predicted


def _dice_at(s: EvaluatedSubject, threshold: float, min_size: int) -> tuple[float, int, int]:
    """(Dice, TP, FP) of the subject at ``threshold`` after component removal."""
    if math.isnan(threshold):
        return math.nan, 0, 0
    if min_size > 1:
        predicted = _binarised(s, threshold, min_size)
        tp = int(np.count_nonzero(predicted & s.lesion))
        fp = int(np.count_nonzero(predicted)) - tp
    else:
        tp, fp = counts_at_threshold(s.positives, s.negatives, threshold)
    return dice_from_counts(tp, fp, int(s.positives.size)), tp, fp


def _subject_metrics(s: EvaluatedSubject, options: EvaluationOptions) -> dict[str, Any]:
    """Per-subject voxel metrics at the subject's own thresholds (lesion level added later)."""
    metrics: dict[str, Any] = {
        "subject": s.subject,
        "abnormal": bool(s.positives.size),
        "image_score": s.image_score,
        "constant_map": _constant(s.positives, s.negatives),
        # already sorted: the in-place sort is a cheap pass and saves a copy of each
        **voxel_metrics_from_groups(s.positives, s.negatives, overwrite_input=True),
    }
    for fpr in options.fprs:
        threshold = threshold_at_fpr(s.positives, s.negatives, fpr)
        metrics[fpr_key("dice", fpr)] = _dice_at(s, threshold, options.min_component_size)[0]
        metrics[fpr_key("threshold", fpr)] = threshold
    if options.min_component_size > 1:
        metrics["dice_cc_at_best_threshold"] = _dice_at(s, metrics["best_dice_threshold"], options.min_component_size)[0]
    return metrics


def _pooled(
    loaded: list[EvaluatedSubject], per_subject: list[dict[str, Any]], options: EvaluationOptions, validation: dict | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pooled voxel metrics, lesion level (adds per-subject columns), image level and intervals."""
    positives = np.sort(np.concatenate([s.positives for s in loaded]))
    negatives = np.sort(np.concatenate([s.negatives for s in loaded]))
    pooled: dict[str, Any] = voxel_metrics_from_groups(positives, negatives, overwrite_input=True)
    n_positive = int(positives.size)
    min_size = options.min_component_size
    ratio_parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for fpr in options.fprs:
        threshold = threshold_at_fpr(positives, negatives, fpr)
        counts = np.array([_dice_at(s, threshold, min_size)[1:] for s in loaded], dtype=np.float64).reshape(-1, 2)
        tp, fp = counts[:, 0].sum(), counts[:, 1].sum()
        pooled[fpr_key("dice", fpr)] = dice_from_counts(int(tp), int(fp), n_positive)
        pooled[fpr_key("threshold", fpr)] = threshold
        lesion_sizes = np.array([s.positives.size for s in loaded], dtype=np.float64)
        ratio_parts[f"pooled_{fpr_key('dice', fpr)}"] = (2 * counts[:, 0], counts.sum(axis=1) + lesion_sizes)
    if min_size > 1:
        counts = np.array([_dice_at(s, pooled["best_dice_threshold"], min_size)[1:] for s in loaded]).reshape(-1, 2)
        pooled["dice_cc_at_best_threshold"] = dice_from_counts(int(counts[:, 0].sum()), int(counts[:, 1].sum()), n_positive)
    curves = {
        "pooled": curve_points(positives, negatives),
        "subjects": {s.subject: curve_points(s.positives, s.negatives, n_points=64) for s in loaded},
    }
    del positives, negatives

    # lesion level at one voxel threshold for the cohort
    if options.threshold is not None:
        lesion_threshold, source = options.threshold, "given (--threshold)"
    elif validation is not None and validation["voxel_threshold"] is not None:
        lesion_threshold, source = validation["voxel_threshold"], f"validation report {options.threshold_from}"
    else:
        lesion_threshold, source = pooled["best_dice_threshold"], "pooled best-Dice threshold of this set, optimistic"
    for s, row in zip(loaded, per_subject):
        if math.isnan(lesion_threshold):
            counts = {"n_lesions": 0, "n_detected": 0, "n_predicted_clusters": 0, "n_fp_clusters": 0}
        else:
            predicted = _binarised(s, lesion_threshold, min_size)
            counts = lesion_detection(predicted, s.lesion, options.lesion_overlap)
            row["threshold_flags"] = degenerate_flags(int(np.count_nonzero(predicted)), int(np.count_nonzero(s.brain)))
            if row["threshold_flags"] == "everything":  # every lesion "found" by flagging the whole brain: not a detection
                counts = {**counts, "n_detected": 0}
        row.update(counts)
        informative = counts["n_lesions"] and row.get("threshold_flags") != "everything"
        row["detection_rate"] = counts["n_detected"] / counts["n_lesions"] if informative else math.nan
    n_lesions = np.array([row["n_lesions"] for row in per_subject], dtype=np.float64)
    n_detected = np.array([row["n_detected"] for row in per_subject], dtype=np.float64)
    informative_lesions = float(sum(row["n_lesions"] for row in per_subject if row.get("threshold_flags") != "everything"))
    fp_clusters = np.array([row["n_fp_clusters"] for row in per_subject], dtype=np.float64)
    pooled["lesion"] = {
        "threshold": lesion_threshold,
        "threshold_source": source,
        "min_overlap": options.lesion_overlap,
        "n_lesions": int(n_lesions.sum()),
        "n_detected": int(n_detected.sum()),
        "detection_rate": float(n_detected.sum() / informative_lesions) if informative_lesions else math.nan,
        "fp_clusters_per_subject": float(fp_clusters.mean()),
        "subjects_where_threshold_flags_everything": [row["subject"] for row in per_subject
                                                      if row.get("threshold_flags") == "everything"],
        "subjects_where_threshold_flags_nothing": [row["subject"] for row in per_subject
                                                   if row.get("threshold_flags") == "nothing"],
    }
    ratio_parts["pooled_detection_rate"] = (n_detected, n_lesions)

    # means over subjects (each subject counts once)
    mean_fields = ["auroc", "auprc", "best_dice", *(fpr_key("dice", f) for f in options.fprs), "detection_rate", "n_fp_clusters"]
    if min_size > 1:
        mean_fields.append("dice_cc_at_best_threshold")
    columns = {name: np.array([row[name] for row in per_subject], dtype=np.float64) for name in mean_fields}
    pooled["mean_over_subjects"] = {
        name: float(np.nanmean(values)) if np.isfinite(values).any() else math.nan for name, values in columns.items()
    }

    if options.image_level == "slice":
        image_scores = np.concatenate([s.slice_scores for s in loaded])
        abnormal = np.concatenate([s.slice_abnormal for s in loaded])
        owner = np.repeat(np.arange(len(loaded)), [s.slice_scores.size for s in loaded])  # sample -> subject
    else:
        image_scores = np.array([s.image_score for s in loaded], dtype=np.float64)
        abnormal = np.array([row["abnormal"] for row in per_subject], dtype=bool)
        owner = np.arange(len(loaded))
    pooled["image_level"] = _image_level(image_scores, abnormal, validation, options)
    curves["image"] = (image_scores, abnormal)

    intervals: dict[str, list[float]] = {}
    if options.bootstrap > 0:
        weights = bootstrap_weights(len(loaded), options.bootstrap, options.seed)
        for name, values in columns.items():
            intervals[f"mean_{name}"] = list(percentile_interval(bootstrap_mean(values, weights), options.confidence))
        for name, (numerators, denominators) in ratio_parts.items():
            intervals[name] = list(percentile_interval(bootstrap_ratio(numerators, denominators, weights), options.confidence))
        if abnormal.any() and (~abnormal).any():
            # a subject drawn twice brings all its slices twice (cluster bootstrap)
            intervals["image_auroc"] = list(
                percentile_interval(bootstrap_auroc(image_scores, abnormal, weights[:, owner]), options.confidence)
            )
    pooled["confidence_intervals"] = {
        "method": f"percentile bootstrap over subjects, {options.bootstrap} resamples, seed {options.seed}, "
        f"{options.confidence:.0%} coverage; thresholds held fixed",
        **intervals,
    }
    return pooled, curves


def _image_level(
    scores: np.ndarray, abnormal: np.ndarray, validation: dict | None, options: EvaluationOptions
) -> dict[str, Any]:
    """Image-level AUROC, AUPRC, the F1-optimal threshold here, and the classification at the applied threshold."""
    f1_threshold = f1_optimal_threshold(scores, abnormal)
    result: dict[str, Any] = {
        "unit": options.image_level,
        "n_abnormal": int(abnormal.sum()),
        "n_normal": int((~abnormal).sum()),
        "auroc": auroc(scores, abnormal),
        "auprc": auprc(scores, abnormal),
        "f1_optimal_threshold": f1_threshold,
    }
    if validation is not None:
        if validation["image_unit"] != options.image_level:
            raise InputError(
                f"{options.threshold_from}: its image threshold is per {validation['image_unit']}, "
                f"this evaluation is per {options.image_level} (--image-level)"
            )
        applied, source, optimistic = validation["image_threshold"], f"validation report {options.threshold_from}", False
    else:
        applied, source, optimistic = f1_threshold, "F1-optimal on this set, optimistic", True
    result.update({"threshold": applied, "threshold_source": source, "optimistic": optimistic})
    if scores.size > 1 and np.all(scores == scores.flat[0]):  # a constant score separates nothing
        result.update({name: math.nan for name in IMAGE_METRIC_FIELDS})
        result.update(threshold=math.nan, f1_optimal_threshold=math.nan,
                      degenerate="every image score is equal: no threshold separates abnormal from normal")
    elif math.isnan(applied):
        result.update({name: math.nan for name in IMAGE_METRIC_FIELDS})
    else:
        result.update(classification_metrics(scores, abnormal, applied))
    return result


image_level_metrics = _image_level  # uadct.image_labels measures images against image labels the same way


# ----------------------------------------------------------------------------- descriptions
def _preview(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _brain_region_text(masks_dir: Path | None) -> str:
    if masks_dir is not None:
        return f"the brain mask of each subject from {masks_dir}"
    return "the voxels where the anomaly map is nonzero or the label is set"
