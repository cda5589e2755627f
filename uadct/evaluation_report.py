"""The files ``uadct evaluate`` writes: ``metrics.json``, ``metrics.csv``, ``report.md`` and the curves.

:mod:`uadct.evaluate` measures; this module only lays the numbers out. Undefined
metrics (NaN) are ``null`` in JSON, ``NaN`` in CSV and ``n/a`` in markdown.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uadct.io import write_json, write_text
from uadct.metrics import IMAGE_METRIC_FIELDS, VOXEL_METRIC_FIELDS

if TYPE_CHECKING:
    from uadct.evaluate import EvaluationOptions

JSON_NAME = "metrics.json"
CSV_NAME = "metrics.csv"
MARKDOWN_NAME = "report.md"
ROC_NAME = "roc.png"
PR_NAME = "pr.png"
IMAGE_ROC_NAME = "image_roc.png"
LESION_FIELDS = ("n_lesions", "n_detected", "detection_rate", "n_predicted_clusters", "n_fp_clusters")


def fpr_key(kind: str, fpr: float) -> str:
    """Column name of a fixed-FPR quantity: ``fpr_key("dice", 0.01) == "dice_at_fpr_0.01"``."""
    return f"{kind}_at_fpr_{fpr:g}"



def write_report(out_dir: Path, per_subject: list[dict[str, Any]], pooled: dict[str, Any], description: dict[str, Any],
                 settings: dict[str, Any], options: "EvaluationOptions", curves: dict[str, Any]) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (each atomically); returns kind -> path."""
    files: dict[str, Path] = {
        "json": write_json(
            _nan_to_none({"per_subject": per_subject, "pooled": pooled, "options": settings, "inputs": description}),
            out_dir / JSON_NAME,
        ),
        "csv": write_text(_csv_text(per_subject, options), out_dir / CSV_NAME),
        "markdown": write_text(_markdown_text(per_subject, pooled, description, options), out_dir / MARKDOWN_NAME),
    }
    if options.plots:
        files.update(_write_plots(curves, pooled, per_subject, out_dir))
    return files


# ----------------------------------------------------------------------------- outputs
def _write_plots(
    curves: dict[str, Any], pooled: dict[str, Any], per_subject: list[dict[str, Any]], out_dir: Path
) -> dict[str, Path]:
    from uadct.report_curves import plot_image_roc, plot_voxel_curves

    files: dict[str, Path] = {}
    if curves["pooled"]["fpr"].size:
        files["roc"] = plot_voxel_curves(curves["pooled"], curves["subjects"], out_dir / ROC_NAME, "roc", pooled["auroc"])
        files["pr"] = plot_voxel_curves(curves["pooled"], curves["subjects"], out_dir / PR_NAME, "pr", pooled["auprc"])
    scores, abnormal = curves["image"]
    if abnormal.any() and (~abnormal).any():
        image = pooled["image_level"]
        files["image_roc"] = plot_image_roc(scores, abnormal, out_dir / IMAGE_ROC_NAME, image["auroc"], image["unit"])
    return files


def _csv_columns(options: EvaluationOptions) -> tuple[str, ...]:
    fixed = tuple(f"{kind}_at_fpr_{f:g}" for f in options.fprs for kind in ("dice", "threshold"))
    cc = ("dice_cc_at_best_threshold",) if options.min_component_size > 1 else ()
    return ("subject", "abnormal", "image_score", *VOXEL_METRIC_FIELDS, *fixed, *cc, *LESION_FIELDS)


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: write undefined metrics as null."""
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _csv_text(per_subject: list[dict[str, Any]], options: EvaluationOptions) -> str:
    columns = _csv_columns(options)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in per_subject:
        writer.writerow([_csv_cell(row[column]) for column in columns])
    return buffer.getvalue()


def _csv_cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else repr(value)
    return str(value)


def _interval(pooled: dict[str, Any], name: str) -> str:
    bounds = pooled["confidence_intervals"].get(name)
    if not bounds or any(b is None or math.isnan(b) for b in bounds):
        return ""
    return f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _markdown_text(
    per_subject: list[dict[str, Any]], pooled: dict[str, Any], description: dict[str, Any], options: EvaluationOptions
) -> str:
    header = "| subject | AUROC | AUPRC | best Dice | threshold | brain voxels | lesion voxels |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"

    def row(name: str, metrics: dict[str, Any]) -> str:
        return (
            f"| {name} | {_number(metrics['auroc'])} | {_number(metrics['auprc'])} | {_number(metrics['best_dice'])} "
            f"| {_number(metrics['best_dice_threshold'], '.4g')} | {metrics['n_voxels']} | {metrics['n_positive']} |"
        )

    fpr_header = "| subject | " + " | ".join(f"Dice @ FPR {f:g} | threshold" for f in options.fprs)
    fpr_header += " | lesions detected | FP clusters | image score | abnormal |"
    fpr_rule = "|---|" + "---:|---:|" * len(options.fprs) + "---:|---:|---:|---|"

    def operating_row(name: str, metrics: dict[str, Any]) -> str:
        cells = [f"{_number(metrics[fpr_key('dice', f)])} | {_number(metrics[fpr_key('threshold', f)], '.4g')}" for f in options.fprs]
        return (
            f"| {name} | {' | '.join(cells)} | {metrics['n_detected']}/{metrics['n_lesions']} | {metrics['n_fp_clusters']} "
            f"| {_number(metrics['image_score'], '.4g')} | {'yes' if metrics['abnormal'] else 'no'} |"
        )

    mean = pooled["mean_over_subjects"]
    lesion = pooled["lesion"]
    image = pooled["image_level"]
    lines = [
        "# Evaluation report",
        "",
        f"Anomaly maps from `{description['maps_dir']}` against lesion labels from `{description['labels_dir']}` "
        f"({len(per_subject)} subject(s), uadct {description['uadct_version']}).",
        "",
        "## Voxel level, pooled over all subjects",
        "",
        header,
        rule,
        row("all (pooled)", pooled),
        "",
        *(
            f"- Dice at voxel FPR {f:g}: {_number(pooled[fpr_key('dice', f)])}"
            f"{_interval(pooled, 'pooled_' + fpr_key('dice', f))} (threshold {_number(pooled[fpr_key('threshold', f)], '.4g')})"
            for f in options.fprs
        ),
        *(
            [f"- Dice at the best-Dice threshold after removing clusters < {options.min_component_size} voxels: "
             f"{_number(pooled['dice_cc_at_best_threshold'])}"]
            if options.min_component_size > 1 else []
        ),
        "",
        f"## Means over subjects ({options.confidence:.0%} bootstrap interval)" if options.bootstrap else "## Means over subjects",
        "",
        *(f"- {name}: {_number(value)}{_interval(pooled, 'mean_' + name)}" for name, value in mean.items()),
        "",
        "## Lesion level",
        "",
        f"- Voxel threshold {_number(lesion['threshold'], '.4g')} ({lesion['threshold_source']}).",
        (f"- **Degenerate threshold**: it flags every brain voxel of {', '.join(lesion['subjects_where_threshold_flags_everything'])}; "
         "their lesions are not counted as detected.\n"
         if lesion.get("subjects_where_threshold_flags_everything") else "")
        + f"- Lesions detected: {lesion['n_detected']} of {lesion['n_lesions']} "
        f"(rate {_number(lesion['detection_rate'])}{_interval(pooled, 'pooled_detection_rate')}).",
        f"- False-positive clusters per subject: {_number(lesion['fp_clusters_per_subject'], '.2f')}.",
        "",
        "## Image level",
        "",
        f"- {image['n_abnormal']} abnormal and {image['n_normal']} normal {image['unit']}(s); "
        f"AUROC {_number(image['auroc'])}{_interval(pooled, 'image_auroc')}.",
        f"- Threshold {_number(image['threshold'], '.4g')} ({image['threshold_source']}): "
        + ", ".join(f"{name} {_number(image[name])}" for name in IMAGE_METRIC_FIELDS)
        + ".",
        f"- F1-optimal threshold on this set: {_number(image['f1_optimal_threshold'], '.4g')} "
        "(pass this report's metrics.json to `--threshold-from` when this set is a validation set).",
        "",
        "## Per subject",
        "",
        header,
        rule,
        *(row(metrics["subject"], metrics) for metrics in per_subject),
        "",
        fpr_header,
        fpr_rule,
        *(operating_row(metrics["subject"], metrics) for metrics in per_subject),
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
        "- **Dice @ FPR f**: Dice at the lowest threshold that flags at most a fraction f of the normal brain voxels "
        "(per subject: its own threshold; pooled: one threshold for all subjects).",
        "- **Pooled**: the brain voxels of all subjects taken as one sample (not an average of subject values); "
        "subjects without a lesion add normal voxels to it.",
        "- **Lesions**: 26-connected components of the label; detected when the binarised map overlaps "
        f"at least max(1, {options.lesion_overlap:g} x size) of their voxels; FP clusters are predicted components "
        "touching no lesion.",
        "- **Image score**: the `image_score` of the map's sidecar JSON when present, else the mean of the top "
        f"{options.image_top_k} map voxels; a subject is abnormal when its label has a lesion voxel in the brain.",
        f"- **Post-processing**: median filter {options.median_filter or 'off'} (voxels, before all metrics); "
        f"small-cluster removal {options.min_component_size or 'off'} (voxels, binarised maps only).",
        "- **n/a**: AUROC and AUPRC are undefined when a subject has only normal (or only lesion) voxels; "
        "Dice values are undefined without lesion voxels.",
    ]
    if description["maps_without_label"]:
        verb = "Normal (map without a label)" if options.unlabelled_are_normal else "Skipped (map without a label)"
        lines.append(f"- **{verb}**: {', '.join(description['maps_without_label'])}.")
    if description["labels_without_map"]:
        lines.append(f"- **Ignored** (label without a map): {', '.join(description['labels_without_map'])}.")
    for failure in description["failed"]:
        lines.append(f"- **Failed** {failure['subject']}: {failure['error']}")
    return "\n".join(lines) + "\n"


def _number(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)

