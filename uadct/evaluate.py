"""Evaluate a folder of anomaly maps against lesion labels: voxel AUROC, AUPRC, best Dice.

Subjects are matched by file name (``<id>.nii.gz`` or ``<id>.nii``) between the maps
folder and the labels folder. Each subject's metrics are measured over its brain
voxels: the brain mask ``<brain_masks_dir>/<id>.nii[.gz]`` when a folder is given,
otherwise the voxels where the map is nonzero or the label is set (maps have their
background set to 0 when scored). The pooled metrics treat the brain voxels of all
subjects as one sample, so subjects without a lesion add normal voxels to the pooled
numbers while their own AUROC/AUPRC are undefined (NaN).

Outputs in ``out_dir`` (written atomically, replacing earlier ones): ``metrics.json``
(per subject, pooled, inputs), ``metrics.csv`` (one row per subject) and ``report.md``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from uadct import __version__
from uadct.errors import InputError
from uadct.io import grid_difference, list_niftis, read_image, read_mask, same_grid, strip_nifti_suffix, write_json, write_text
from uadct.metrics import VOXEL_METRIC_FIELDS, voxel_metrics_from_groups

log = logging.getLogger(__name__)

JSON_NAME = "metrics.json"
CSV_NAME = "metrics.csv"
MARKDOWN_NAME = "report.md"
CSV_COLUMNS = ("subject", *VOXEL_METRIC_FIELDS)

ProgressCallback = Callable[[int, int, str], None]
"""Called after each subject with (subjects done, subjects to do, subject id)."""


@dataclass
class EvaluationResult:
    """What :func:`evaluate_folder` measured and wrote.

    ``per_subject``: one dict per evaluated subject, ``{"subject": id, **voxel_metrics}``,
    sorted by id; ``pooled``: the voxel metrics over all subjects' brain voxels together;
    ``files``: ``"json"``, ``"markdown"``, ``"csv"`` -> written paths; ``missing``: ids of
    maps that have no label (skipped).
    """

    per_subject: list[dict]
    pooled: dict
    files: dict[str, Path]
    missing: list[str] = field(default_factory=list)


def evaluate_folder(
    maps_dir: str | Path,
    labels_dir: str | Path,
    out_dir: str | Path,
    brain_masks_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
) -> EvaluationResult:
    """Measure voxel AUROC, AUPRC and best Dice of every map in ``maps_dir`` against its label.

    Labels must lie on their map's grid, and so must brain masks. Maps without a label are
    skipped (logged, listed in ``EvaluationResult.missing``); when a brain mask folder is
    given every evaluated subject needs a mask there. Each volume is read once; memory
    holds one subject plus the pooled brain-voxel scores (float32, 4 bytes per voxel).

    Raises :class:`InputError` naming the folder or file when a folder has no NIfTI files,
    no map has a label, a grid differs, a mask is missing, or a brain region is empty.
    """
    maps_dir, labels_dir, out_dir = Path(maps_dir), Path(labels_dir), Path(out_dir)
    masks_dir = Path(brain_masks_dir) if brain_masks_dir is not None else None

    maps = _niftis_by_subject(maps_dir)
    labels = _niftis_by_subject(labels_dir)
    masks = _niftis_by_subject(masks_dir) if masks_dir is not None else {}
    if not maps:
        raise InputError(f"{maps_dir}: no anomaly maps (.nii or .nii.gz files) found")
    subjects = sorted(set(maps) & set(labels))
    missing = sorted(set(maps) - set(labels))
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

    per_subject: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    pooled_lesion: list[np.ndarray] = []
    pooled_normal: list[np.ndarray] = []
    for done, subject in enumerate(subjects, start=1):
        mask_path = masks.get(subject)
        scores, is_lesion = _brain_voxels(maps[subject], labels[subject], mask_path)
        lesion_scores, normal_scores = scores[is_lesion], scores[~is_lesion]
        del scores, is_lesion
        # sorting the subject's copies in place is harmless: the pooled metrics sort anyway
        metrics = voxel_metrics_from_groups(lesion_scores, normal_scores, overwrite_input=True)
        per_subject.append({"subject": subject, **metrics})
        inputs.append(
            {
                "subject": subject,
                "map": str(maps[subject]),
                "label": str(labels[subject]),
                "brain_mask": str(mask_path) if mask_path is not None else None,
            }
        )
        pooled_lesion.append(lesion_scores)
        pooled_normal.append(normal_scores)
        log.debug("%s: %s", subject, metrics)
        if progress is not None:
            progress(done, len(subjects), subject)

    pooled = _pooled_metrics(pooled_lesion, pooled_normal)
    log.info(
        "evaluated %d subject(s): pooled AUROC %.4f, AUPRC %.4f, best Dice %.4f",
        len(subjects),
        pooled["auroc"],
        pooled["auprc"],
        pooled["best_dice"],
    )

    description = {
        "maps_dir": str(maps_dir),
        "labels_dir": str(labels_dir),
        "brain_masks_dir": str(masks_dir) if masks_dir is not None else None,
        "brain_region": _brain_region_text(masks_dir),
        "threshold_rule": "a voxel is called anomalous when its score >= threshold",
        "subjects": inputs,
        "maps_without_label": missing,
        "labels_without_map": unused_labels,
        "uadct_version": __version__,
    }
    files = {
        "json": write_json(
            _nan_to_none({"per_subject": per_subject, "pooled": pooled, "inputs": description}),
            out_dir / JSON_NAME,
        ),
        "csv": write_text(_csv_text(per_subject), out_dir / CSV_NAME),
        "markdown": write_text(_markdown_text(per_subject, pooled, description), out_dir / MARKDOWN_NAME),
    }
    return EvaluationResult(per_subject=per_subject, pooled=pooled, files=files, missing=missing)


def _niftis_by_subject(folder: Path) -> dict[str, Path]:
    """Subject id -> NIfTI file in ``folder``; two files with the same id are an error."""
    found: dict[str, Path] = {}
    for path in list_niftis(folder):
        subject = strip_nifti_suffix(path)
        if subject in found:
            raise InputError(f"{path}: same subject id {subject!r} as {found[subject]}; keep one of the two")
        found[subject] = path
    return found


def _brain_voxels(map_path: Path, label_path: Path, mask_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The map's scores ``(N,) float32`` and lesion flags ``(N,) bool`` over the brain voxels."""
    map_image = read_image(map_path, allow_empty=True)
    label_image = read_mask(label_path)
    if not same_grid(label_image, map_image):
        raise InputError(
            f"{label_path}: the label is not on the grid of its map {map_path} ({grid_difference(label_image, map_image)})"
        )
    scores_volume = sitk.GetArrayViewFromImage(map_image)
    lesion_volume = sitk.GetArrayViewFromImage(label_image) != 0
    if mask_path is not None:
        mask_image = read_mask(mask_path, reference=map_image)  # keep a reference: the view below borrows its buffer
        brain = sitk.GetArrayViewFromImage(mask_image) != 0
        if not brain.any():
            raise InputError(f"{mask_path}: the brain mask is empty")
        outside = int(np.count_nonzero(lesion_volume & ~brain))
        if outside:
            log.warning(
                "%s: %d lesion voxel(s) lie outside the brain mask %s and are not counted", label_path, outside, mask_path
            )
    else:
        brain = (scores_volume != 0) | lesion_volume
        if not brain.any():
            raise InputError(
                f"{map_path}: the map is all zero and its label {label_path} is empty, "
                "so there is no brain region to evaluate"
            )
    return scores_volume[brain], lesion_volume[brain]


def _pooled_metrics(lesion_chunks: list[np.ndarray], normal_chunks: list[np.ndarray]) -> dict[str, float | int]:
    """Voxel metrics over all subjects; empties the chunk lists to free memory early."""
    lesion = np.concatenate(lesion_chunks)
    lesion_chunks.clear()
    normal = np.concatenate(normal_chunks)
    normal_chunks.clear()
    return voxel_metrics_from_groups(lesion, normal, overwrite_input=True)


def _preview(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _brain_region_text(masks_dir: Path | None) -> str:
    if masks_dir is not None:
        return f"the brain mask of each subject from {masks_dir}"
    return "the voxels where the anomaly map is nonzero or the label is set"


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: write undefined metrics as null."""
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _csv_text(per_subject: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in per_subject:
        writer.writerow([_csv_cell(row[column]) for column in CSV_COLUMNS])
    return buffer.getvalue()


def _csv_cell(value: Any) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else repr(value)
    return str(value)


def _markdown_text(per_subject: list[dict[str, Any]], pooled: dict[str, Any], description: dict[str, Any]) -> str:
    header = "| subject | AUROC | AUPRC | best Dice | threshold | brain voxels | lesion voxels |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"

    def row(name: str, metrics: dict[str, Any]) -> str:
        return (
            f"| {name} | {_number(metrics['auroc'])} | {_number(metrics['auprc'])} | {_number(metrics['best_dice'])} "
            f"| {_number(metrics['best_dice_threshold'], '.4g')} | {metrics['n_voxels']} | {metrics['n_positive']} |"
        )

    lines = [
        "# Voxel-level evaluation",
        "",
        f"Anomaly maps from `{description['maps_dir']}` against lesion labels from `{description['labels_dir']}` "
        f"({len(per_subject)} subject(s), uadct {description['uadct_version']}).",
        "",
        "## Pooled over all subjects",
        "",
        header,
        rule,
        row("all (pooled)", pooled),
        "",
        "## Per subject",
        "",
        header,
        rule,
        *(row(metrics["subject"], metrics) for metrics in per_subject),
        "",
        "## What was measured and how",
        "",
        f"- **Brain region**: only voxels inside {description['brain_region']} count; "
        "everything else is ignored (lesion voxels outside the brain mask included).",
        "- **Lesion voxels** are the nonzero voxels of the label; all other brain voxels are normal.",
        "- **AUROC**: area under the ROC curve of the voxel scores, i.e. the probability that a lesion voxel "
        "scores higher than a normal voxel (ties count one half).",
        "- **AUPRC**: average precision, the sum over thresholds of (increase in recall) x precision, "
        "as in scikit-learn's `average_precision_score` (step-wise, not a trapezoid).",
        "- **Best Dice**: the highest Dice overlap `2 TP / (TP + FP + lesion voxels)` between the label and the "
        "voxels with `score >= threshold`, over every threshold (all distinct scores); the threshold column gives "
        "the highest threshold reaching it. Voxels with equal scores are always on the same side of a threshold.",
        "- **Pooled**: the brain voxels of all subjects taken as one sample (not an average of subject values); "
        "subjects without a lesion add normal voxels to it.",
        "- **n/a**: AUROC and AUPRC are undefined when a subject has only normal (or only lesion) voxels; "
        "best Dice is undefined without lesion voxels.",
    ]
    if description["maps_without_label"]:
        lines.append(f"- **Skipped** (map without a label): {', '.join(description['maps_without_label'])}.")
    if description["labels_without_map"]:
        lines.append(f"- **Ignored** (label without a map): {', '.join(description['labels_without_map'])}.")
    return "\n".join(lines) + "\n"


def _number(value: float, spec: str = ".4f") -> str:
    return "n/a" if math.isnan(value) else format(value, spec)
