"""The evaluation's curve plots: voxel ROC and precision-recall (pooled and per subject), image-level ROC.

Drawn on a bare ``matplotlib`` Figure with the Agg canvas (no pyplot state, no display)
and written atomically; :mod:`uadct.evaluation_report` calls them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uadct.errors import UadctError
from uadct.io import atomic_path
from uadct.report import DPI

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVE_INCHES = 5.0


def plot_voxel_curves(
    pooled: dict[str, np.ndarray],
    subjects: dict[str, dict[str, np.ndarray]],
    out_png: str | Path,
    kind: str,
    area: float,
) -> Path:
    """Write the voxel ROC (``kind="roc"``) or precision-recall (``"pr"``) curve to ``out_png``.

    ``pooled`` and each value of ``subjects`` hold ``fpr``, ``tpr`` and ``precision`` arrays
    (:func:`uadct.metrics.curve_points`). The pooled curve is drawn thick, subjects as thin
    grey lines; ``area`` (AUROC or AUPRC) goes in the legend. Written atomically.
    """
    if kind not in ("roc", "pr"):
        raise UadctError(f"kind must be 'roc' or 'pr', got {kind!r}")
    figure, axes = _curve_figure()
    x_key, y_key = ("fpr", "tpr") if kind == "roc" else ("tpr", "precision")
    drawn = [points for points in subjects.values() if points[x_key].size]  # subjects with both classes
    for points in drawn:
        axes.plot(points[x_key], points[y_key], color="0.6", linewidth=0.6, alpha=0.7)
    name = "AUROC" if kind == "roc" else "AUPRC"
    axes.plot(pooled[x_key], pooled[y_key], color="#c0392b", linewidth=2.0, label=f"pooled ({name} {area:.3f})")
    if drawn:
        axes.plot([], [], color="0.6", linewidth=0.6, label=f"per subject ({len(drawn)} with lesions)")
    if kind == "roc":
        axes.plot([0, 1], [0, 1], color="0.3", linestyle=":", linewidth=0.8, label="chance")
        axes.set(xlabel="false-positive rate (normal brain voxels)", ylabel="true-positive rate (lesion voxels)",
                 title="Voxel-level ROC")
        axes.legend(loc="lower right", fontsize=8)
    else:
        axes.set(xlabel="recall (lesion voxels)", ylabel="precision", title="Voxel-level precision-recall")
        axes.legend(loc="upper right", fontsize=8)
    return _save_curve(figure, out_png)


def plot_image_roc(
    scores: np.ndarray, abnormal: np.ndarray, out_png: str | Path, area: float, unit: str = "subject"
) -> Path:
    """Write the image-level ROC curve of ``(N,)`` scores against ``(N,)`` bool truth (``unit``: subject or slice)."""
    scores = np.asarray(scores, dtype=np.float64)
    abnormal = np.asarray(abnormal, dtype=bool)
    positives, negatives = np.sort(scores[abnormal]), np.sort(scores[~abnormal])
    thresholds = np.concatenate(([np.inf], np.unique(scores)[::-1]))
    tpr = (positives.size - np.searchsorted(positives, thresholds, side="left")) / positives.size
    fpr = (negatives.size - np.searchsorted(negatives, thresholds, side="left")) / negatives.size
    figure, axes = _curve_figure()
    # straight lines between the points: tied scores give the diagonal segment AUROC counts as one half
    axes.plot(fpr, tpr, color="#2c3e50", linewidth=2.0,
              label=f"{positives.size} abnormal / {negatives.size} normal {unit}s (AUROC {area:.3f})")
    axes.plot([0, 1], [0, 1], color="0.3", linestyle=":", linewidth=0.8, label="chance")
    axes.set(xlabel=f"false-positive rate (normal {unit}s)", ylabel=f"true-positive rate (abnormal {unit}s)",
             title=f"Image-level ROC ({unit}s)")
    axes.legend(loc="lower right", fontsize=8)
    return _save_curve(figure, out_png)


def _curve_figure() -> tuple[Figure, object]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(CURVE_INCHES, CURVE_INCHES), dpi=DPI)
    axes = figure.add_subplot(1, 1, 1)
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    axes.grid(True, linewidth=0.4, alpha=0.5)
    return figure, axes


def _save_curve(figure: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return out_png
