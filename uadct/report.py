"""Heatmap montages: an anomaly map over its scan, three views, colour bar and lesion outline.

:func:`render_heatmap` reorients the scan, the map and an optional lesion label to
LPS (``SimpleITK.DICOMOrient``), so a volume stored in any orientation (RAS, LPS,
permuted axes) gives the same picture. The montage has three rows, one per view, all
in **radiological convention** (the patient's right on the viewer's left):

- axial: anterior at the top, right on the left;
- coronal: superior at the top, right on the left;
- sagittal: superior at the top, anterior on the left.

Panels are drawn with the voxel spacing as aspect ratio. In each view the slices are
those where the map is highest (inside the head), spread out and sorted by position.
The map and the label must lie on the scan's grid, or with ``resample=True`` they are
resampled onto it through their own affines (linear for the map, nearest neighbour for
the label). The colour bar names the map's unit, read from the ``uadct score`` sidecar
(``<map id>.json``) when there is one. Drawing uses a bare ``matplotlib`` Figure with
the Agg canvas, so no pyplot state is touched and no display is needed.

:mod:`uadct.report_page` draws every subject of a folder into one self-contained HTML
page; :mod:`uadct.report_curves` draws the evaluation's ROC/PR curves.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from uadct.arrays import bounding_box, top_k_mean
from uadct.errors import InputError, UadctError
from uadct.io import atomic_path, grid_difference, read_image, read_mask, same_grid
from uadct.scoremap import GENERIC_UNIT, ScoreSidecar

if TYPE_CHECKING:
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DISPLAY_ORIENTATION = "LPS"  # array (z, y, x): x towards Left, y towards Posterior, z towards Superior
VIEWS = ("axial", "coronal", "sagittal")  # montage rows, top to bottom
VIEW_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # array axis the view slices along
PANEL_INCHES = 2.5  # each slice panel is a square of this size
COLORBAR_INCHES = 1.2  # strip on the right holding the colour bar and its label
TITLE_INCHES = 0.5  # strip at the top holding the title
DPI = 100  # a 6-slice montage is 1620 x 800 pixels
DEFAULT_SLICES = 6  # per view
DEFAULT_THRESHOLD_PERCENTILE = 95.0  # of the nonzero map values
WINDOW_PERCENTILES = (1.0, 99.0)  # grey window of the subject scan, over its nonzero voxels
TOP_FRACTION = 0.005  # a slice's score: sum of its top 0.5 % map values
OVERLAY_ALPHA = 0.65
CONTOUR_COLOUR = "#00e5ff"  # cyan: stands out against the grey scan and the red-yellow overlay
CROP_MARGIN_VOXELS = 3
FILL_MARGIN = 0.1  # fraction of the head's slice range left out at each end when filling slices
TEXT_BOX = {"facecolor": "black", "alpha": 0.55, "edgecolor": "none", "pad": 1.5}  # keeps captions readable on anatomy


def render_heatmap(
    subject: str | Path,
    anomaly_map: str | Path,
    out_png: str | Path,
    label: str | Path | None = None,
    n_slices: int = DEFAULT_SLICES,
    threshold: float | None = None,
    title: str | None = None,
    unit: str | None = None,
    resample: bool = False,
) -> Path:
    """Write a 3-view montage of ``anomaly_map`` over ``subject`` to ``out_png``; return its path.

    ``n_slices`` panels per view (axial, coronal, sagittal rows). The map is shown where it
    exceeds ``threshold`` (default: the 95th percentile of its nonzero values) and is
    transparent below; an all-zero map gives the scan alone. ``label`` (a lesion mask) is
    drawn as an outline. ``unit`` labels the colour bar (default: from the map's sidecar,
    see :func:`map_unit`); ``title`` defaults to the subject's file name. The PNG is
    written atomically. Raises :class:`InputError` naming the file for unreadable inputs,
    a grid mismatch (unless ``resample``) or a map that does not overlap the scan.
    """
    from uadct.heatmap2d import is_single_slice, render_heatmap_2d

    if is_single_slice(read_image(subject)):  # a 2D image: one overlay panel, the picture as stored
        return render_heatmap_2d(subject, anomaly_map, out_png, label, threshold, title, unit, resample)
    figure = heatmap_montage(subject, anomaly_map, label, n_slices, threshold, title, unit, resample).figure
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, facecolor=figure.get_facecolor())
    return out_png


@dataclass
class HeatmapMontage:
    """What :func:`heatmap_montage` drew: the figure and the chosen slice indices per view (LPS array)."""

    figure: Figure
    slices: dict[str, list[int]]
    threshold: float | None
    unit: str


def heatmap_montage(
    subject: str | Path,
    anomaly_map: str | Path,
    label: str | Path | None = None,
    n_slices: int = DEFAULT_SLICES,
    threshold: float | None = None,
    title: str | None = None,
    unit: str | None = None,
    resample: bool = False,
) -> HeatmapMontage:
    """Read, check, reorient and draw (no file written); see :func:`render_heatmap` for the arguments."""
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise UadctError(f"n_slices must be a whole number >= 1, got {n_slices!r}")
    if threshold is not None and not math.isfinite(threshold):
        raise UadctError(f"threshold must be a finite number, got {threshold!r}")
    subject, anomaly_map = Path(subject), Path(anomaly_map)

    subject_image = read_image(subject)
    map_image = _on_grid(read_image(anomaly_map, allow_empty=True), subject_image, anomaly_map, subject, resample, False)
    label_image = None
    if label is not None:
        label = Path(label)
        label_image = _on_grid(read_mask(label), subject_image, label, subject, resample, True)

    scan = _to_display(subject_image)
    values = sitk.GetArrayFromImage(_to_display(map_image))
    outline = None if label_image is None else sitk.GetArrayFromImage(_to_display(label_image)) > 0
    scan_array = sitk.GetArrayFromImage(scan)

    if threshold is None:
        threshold = default_threshold(values)
    window = _grey_window(scan_array)
    foreground = scan_array > window[0] + 0.1 * (window[1] - window[0])
    # slices are picked inside the map's support (the brain of a scored map), else inside the head
    support = values != 0
    region = support if support.any() else foreground
    slices = {view: choose_slices(values, n_slices, threshold, region, axis=VIEW_AXIS[view]) for view in VIEWS}
    log.info("heatmap %s: slices %s, threshold %s", subject.name, slices, threshold)
    unit = unit if unit is not None else map_unit(anomaly_map)

    figure = _draw_montage(
        scan=scan,
        scan_array=scan_array,
        values=values,
        outline=outline,
        slices=slices,
        window=window,
        threshold=threshold,
        crop=_crop_box(foreground, values, threshold, outline),
        title=subject.name if title is None else title,
        unit=unit,
    )
    return HeatmapMontage(figure, slices, threshold, unit)


def map_unit(anomaly_map: str | Path) -> str:
    """Colour-bar label for a map, from its ``uadct score`` sidecar ``<id>.json`` when present.

    The sidecar's ``unit`` field wins; a MOOD-scaled map is "anomaly score (0-1, MOOD
    scaling)"; otherwise the model and output kind are named. Without a readable sidecar:
    "anomaly score (map units)".
    """
    try:
        sidecar = ScoreSidecar.read(anomaly_map)
    except InputError:
        return GENERIC_UNIT
    return sidecar.colour_bar_unit if sidecar is not None else GENERIC_UNIT


def default_threshold(values: np.ndarray) -> float | None:
    """The 95th percentile of the nonzero values of a map, or ``None`` for an all-zero map."""
    nonzero = values[values != 0]
    if nonzero.size == 0:
        return None
    return float(np.percentile(nonzero, DEFAULT_THRESHOLD_PERCENTILE))


def choose_slices(
    values: np.ndarray,
    n_slices: int,
    threshold: float | None,
    foreground: np.ndarray | None = None,
    axis: int = 0,
) -> list[int]:
    """Slice indices along ``axis`` where a ``(D, H, W)`` map is highest, spread out, sorted by position.

    Slices holding values above ``threshold`` are ranked by the sum of their top 0.5 %
    values and taken greedily, at least ``depth / (2 n_slices)`` slices apart (so the
    slice holding the map maximum is always first chosen); the rest are filled by
    farthest-point sampling inside the ``foreground`` (the head's slice range), so an
    all-zero map gives evenly spaced slices. Fill slices come from the inner 80 % of
    that range (its ends hold little anatomy) until it is used up.
    """
    values = np.moveaxis(values, axis, 0)
    if foreground is not None:
        foreground = np.moveaxis(foreground, axis, 0)
    depth = values.shape[0]
    n_slices = min(n_slices, depth)
    first, last = 0, depth - 1
    if foreground is not None and foreground.any():
        occupied = np.flatnonzero(foreground.reshape(depth, -1).any(axis=1))
        first, last = int(occupied[0]), int(occupied[-1])
        if last - first + 1 < n_slices:
            first, last = 0, depth - 1
    separation = max(1, (last - first + 1) // (2 * n_slices))

    chosen: list[int] = []
    if threshold is not None:
        flat = values.reshape(depth, -1)
        top = max(1, int(math.ceil(TOP_FRACTION * flat.shape[1])))
        scores = top_k_mean(flat, top, axis=1)  # per slice; ranks like the sum (same k everywhere)
        has_overlay = (flat > threshold).any(axis=1)
        peak = int(np.argmax(flat.max(axis=1)))
        order = [peak] + [int(i) for i in np.argsort(-scores, kind="stable") if int(i) != peak]
        for index in order:
            if len(chosen) == n_slices:
                break
            if has_overlay[index] and all(abs(index - c) >= separation for c in chosen):
                chosen.append(index)

    if not chosen:
        chosen = sorted({int(round(z)) for z in np.linspace(first, last, n_slices + 2)[1:-1]})
    # fill from the inner 80 % of the head's range: its extreme slices hold little anatomy
    inner = int(round(FILL_MARGIN * (last - first)))
    candidates = np.arange(first + inner, last - inner + 1)
    while len(chosen) < n_slices:
        distance = np.min(np.abs(candidates[:, None] - np.array(chosen)[None, :]), axis=1)
        best = int(np.argmax(distance))  # first of the farthest: deterministic
        if distance[best] == 0:
            candidates = np.arange(depth)
            continue
        chosen.append(int(candidates[best]))
    return sorted(chosen)


def _to_display(image: sitk.Image) -> sitk.Image:
    """Reorient to LPS so that array rows run anterior -> posterior and columns right -> left."""
    return sitk.DICOMOrient(image, DISPLAY_ORIENTATION)


def _on_grid(
    image: sitk.Image, reference: sitk.Image, path: Path, reference_path: Path, resample: bool, is_label: bool
) -> sitk.Image:
    """``image`` on the reference grid: as is when it already is, resampled when allowed, else an error."""
    if same_grid(image, reference):
        return image
    if not resample:
        raise InputError(
            f"{path}: not on the grid of {reference_path} ({grid_difference(image, reference)}); "
            "pass --resample to resample it through its affine"
        )
    if not _overlaps(image, reference):
        raise InputError(f"{path}: does not overlap {reference_path} in physical space (check the affines)")
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    pixel = sitk.sitkUInt8 if is_label else sitk.sitkFloat32
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, pixel)


def _overlaps(image: sitk.Image, reference: sitk.Image) -> bool:
    """Whether the physical bounding boxes of two images intersect."""

    def box(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
        size = img.GetSize()
        corners = np.array(
            [img.TransformContinuousIndexToPhysicalPoint([c * (n - 1) for c, n in zip(corner, size)])
             for corner in np.ndindex(2, 2, 2)]
        )
        return corners.min(axis=0), corners.max(axis=0)

    low_a, high_a = box(image)
    low_b, high_b = box(reference)
    return bool(np.all(low_a <= high_b) and np.all(low_b <= high_a))


def _grey_window(array: np.ndarray) -> tuple[float, float]:
    """Robust (1st, 99th) percentile window of the nonzero voxels (a strided sample when large)."""
    stride = max(1, int(round((array.size / 2_000_000) ** (1 / 3))))
    sample = array[::stride, ::stride, ::stride]
    sample = sample[sample != 0]
    if sample.size == 0:
        sample = array[array != 0]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(sample, WINDOW_PERCENTILES))
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    if high <= low:
        high = low + 1.0
    return low, high


def _crop_box(
    foreground: np.ndarray, values: np.ndarray, threshold: float | None, outline: np.ndarray | None
) -> tuple[slice, slice, slice]:
    """(z, y, x) box around the head, the overlay and the label, plus a margin."""
    keep = foreground.copy()
    if threshold is not None:
        keep |= values > threshold
    if outline is not None:
        keep |= outline
    z, y, x = bounding_box(keep, margin=CROP_MARGIN_VOXELS)
    return z, y, x


def _panel(volume: np.ndarray, view: str, index: int, crop: tuple[slice, slice, slice]) -> np.ndarray:
    """The 2D panel of an LPS ``(z, y, x)`` volume as displayed (rows top to bottom, columns left to right)."""
    z, y, x = crop
    if view == "axial":
        return volume[index, y, x]  # rows anterior -> posterior, columns right -> left
    if view == "coronal":
        return volume[z, index, x][::-1]  # rows superior -> inferior, columns right -> left
    return volume[z, y, index][::-1]  # sagittal: rows superior -> inferior, columns anterior -> posterior


def _panel_aspect(spacing: tuple[float, float, float], view: str) -> float:
    """Row spacing / column spacing of a panel (imshow's aspect)."""
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[view]


# letters at (left, right, top) of the first panel of each row
VIEW_LETTERS = {"axial": ("R", "L", "A"), "coronal": ("R", "L", "S"), "sagittal": ("A", "P", "S")}


def _overlay_colormap() -> Colormap:
    """``hot`` without its black end and its white top, so every shown value is visible on grey."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps["hot"](np.linspace(0.3, 0.92, 256)), name="hot_overlay")


def _draw_montage(
    *,
    scan: sitk.Image,
    scan_array: np.ndarray,
    values: np.ndarray,
    outline: np.ndarray | None,
    slices: dict[str, list[int]],
    window: tuple[float, float],
    threshold: float | None,
    crop: tuple[slice, slice, slice],
    title: str,
    unit: str,
) -> Figure:
    """Build the montage Figure (one row of square panels per view, colour bar on the right, title on top)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n_columns = max(len(s) for s in slices.values())
    n_rows = len(VIEWS)
    width = n_columns * PANEL_INCHES + COLORBAR_INCHES
    height = n_rows * PANEL_INCHES + TITLE_INCHES
    figure = Figure(figsize=(width, height), dpi=DPI, facecolor="black")

    map_max = float(values.max()) if values.size else 0.0
    shows_overlay = threshold is not None and map_max > threshold
    if threshold is None:
        norm = Normalize(vmin=0.0, vmax=1.0)
    else:
        norm = Normalize(vmin=threshold, vmax=map_max if shows_overlay else threshold + max(abs(threshold), 1.0))
    cmap = _overlay_colormap()
    spacing = scan.GetSpacing()
    centre = [n // 2 for n in scan.GetSize()]  # (x, y, z) index

    for row, view in enumerate(VIEWS):
        axis = VIEW_AXIS[view]
        aspect = _panel_aspect(spacing, view)
        for column, index in enumerate(slices[view]):
            axes = figure.add_axes(
                (
                    column * PANEL_INCHES / width,
                    1 - (TITLE_INCHES + (row + 1) * PANEL_INCHES) / height,
                    PANEL_INCHES / width,
                    PANEL_INCHES / height,
                )
            )
            axes.set_facecolor("black")
            axes.set_axis_off()
            axes.imshow(_panel(scan_array, view, index, crop), cmap="gray", vmin=window[0], vmax=window[1],
                        aspect=aspect, interpolation="bilinear")
            if shows_overlay:
                shown = np.ma.masked_less_equal(_panel(values, view, index, crop), threshold)
                if shown.count():
                    axes.imshow(shown, cmap=cmap, norm=norm, alpha=OVERLAY_ALPHA, aspect=aspect, interpolation="nearest")
            if outline is not None:
                lesion = _panel(outline, view, index, crop)
                if lesion.any():
                    axes.contour(lesion.astype(np.float32), levels=[0.5], colors=CONTOUR_COLOUR, linewidths=1.2)
            voxel = list(centre)
            voxel[2 - axis] = int(index)  # array axis 0 is the image's z (index 2)
            position = scan.TransformIndexToPhysicalPoint(voxel)[2 - axis]
            axes.text(0.03, 0.03, f"{view} {'xyz'[2 - axis]} {position:+.1f} mm", transform=axes.transAxes,
                      color="white", fontsize=8, ha="left", va="bottom", bbox=TEXT_BOX)
            if column == 0:
                left, right, top = VIEW_LETTERS[view]
                for x, letter, align in ((0.02, left, "left"), (0.98, right, "right")):
                    axes.text(x, 0.5, letter, transform=axes.transAxes, color="#bbbbbb", fontsize=10,
                              ha=align, va="center", fontweight="bold", bbox=TEXT_BOX)
                axes.text(0.5, 0.98, top, transform=axes.transAxes, color="#bbbbbb", fontsize=10,
                          ha="center", va="top", fontweight="bold", bbox=TEXT_BOX)

    figure.text(
        0.5 * n_columns * PANEL_INCHES / width, 1 - 0.5 * TITLE_INCHES / height, title,
        color="white", fontsize=13, ha="center", va="center",
    )
    colorbar_axes = figure.add_axes(
        (
            (n_columns * PANEL_INCHES + 0.15) / width,
            0.2 * n_rows * PANEL_INCHES / height,
            0.22 / width,
            0.6 * n_rows * PANEL_INCHES / height,
        )
    )
    colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=colorbar_axes)
    if threshold is None:
        caption = f"{unit}\n(map all zero: no overlay)"
    elif not shows_overlay:
        caption = f"{unit}\nnothing above {threshold:.3g}"
    else:
        caption = f"{unit}\nshown above {threshold:.3g}"
    colorbar.set_label(caption, color="white", fontsize=9)
    colorbar.ax.tick_params(colors="white", labelsize=8)
    colorbar.outline.set_edgecolor("white")
    if outline is not None:
        figure.legend(
            handles=[Line2D([], [], color=CONTOUR_COLOUR, linewidth=1.5, label="lesion label")],
            loc="lower right", frameon=False, labelcolor="white", fontsize=8,
        )
    return figure
