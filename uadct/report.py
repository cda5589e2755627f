"""Heatmap overlays: an axial montage of an anomaly map on the subject's scan.

:func:`render_heatmap` reorients the scan, the map and an optional lesion label to
LPS (``SimpleITK.DICOMOrient``), so a volume stored in any orientation (RAS, LPS,
permuted axes) gives the same picture: axial slices in radiological convention
(patient's right on the viewer's left, anterior at the top), drawn with the voxel
spacing as aspect ratio. The slices are those where the map is highest, spread out
and sorted from inferior to superior. Drawing uses a bare ``matplotlib`` Figure with
the Agg canvas, so no pyplot state is touched and no display is needed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from uadct.errors import InputError, UadctError
from uadct.io import atomic_path, grid_difference, read_image, read_mask, same_grid

if TYPE_CHECKING:
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DISPLAY_ORIENTATION = "LPS"  # array (z, y, x): x towards Left, y towards Posterior, z towards Superior
PANEL_INCHES = 2.5  # each slice panel is a square of this size
COLORBAR_INCHES = 1.2  # strip on the right holding the colour bar and its label
TITLE_INCHES = 0.5  # strip at the top holding the title
DPI = 100  # a 12-slice montage is 1120 x 800 pixels
MAX_COLUMNS = 4  # montage columns (more when n_slices > 16: ceil(sqrt(n)))
DEFAULT_THRESHOLD_PERCENTILE = 95.0  # of the nonzero map values
WINDOW_PERCENTILES = (1.0, 99.0)  # grey window of the subject scan, over its nonzero voxels
TOP_FRACTION = 0.005  # a slice's score: sum of its top 0.5 % map values
OVERLAY_ALPHA = 0.65
CONTOUR_COLOUR = "#00e5ff"  # cyan: stands out against the grey scan and the red-yellow overlay
CROP_MARGIN_VOXELS = 3
TEXT_BOX = {"facecolor": "black", "alpha": 0.55, "edgecolor": "none", "pad": 1.5}  # keeps captions readable on anatomy


def render_heatmap(
    subject: str | Path,
    anomaly_map: str | Path,
    out_png: str | Path,
    label: str | Path | None = None,
    n_slices: int = 12,
    threshold: float | None = None,
    title: str | None = None,
) -> Path:
    """Write an axial montage of ``anomaly_map`` over ``subject`` to ``out_png``; return its path.

    ``anomaly_map`` and ``label`` (a lesion mask, drawn as an outline) must lie on the
    subject's grid. The map is shown where it exceeds ``threshold`` (default: the
    95th percentile of its nonzero values); an all-zero map gives the scan alone.
    ``title`` defaults to the subject's file name. The PNG is written atomically.
    Raises :class:`InputError` naming the file for unreadable inputs or grid mismatches.
    """
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise UadctError(f"n_slices must be a whole number >= 1, got {n_slices!r}")
    if threshold is not None and not math.isfinite(threshold):
        raise UadctError(f"threshold must be a finite number, got {threshold!r}")
    subject, anomaly_map, out_png = Path(subject), Path(anomaly_map), Path(out_png)

    subject_image = read_image(subject)
    map_image = read_image(anomaly_map, allow_empty=True)
    _check_grid(map_image, subject_image, anomaly_map, subject)
    label_image = None
    if label is not None:
        label = Path(label)
        label_image = read_mask(label)
        _check_grid(label_image, subject_image, label, subject)

    scan = _to_display(subject_image)
    values = sitk.GetArrayFromImage(_to_display(map_image))
    outline = None if label_image is None else sitk.GetArrayFromImage(_to_display(label_image)) > 0
    scan_array = sitk.GetArrayFromImage(scan)

    if threshold is None:
        threshold = default_threshold(values)
    window = _grey_window(scan_array)
    foreground = scan_array > window[0] + 0.1 * (window[1] - window[0])
    slices = choose_slices(values, n_slices, threshold, foreground)
    log.info("heatmap %s: slices %s, threshold %s", subject.name, slices, threshold)

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
    )
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, facecolor=figure.get_facecolor())
    return out_png


def default_threshold(values: np.ndarray) -> float | None:
    """The 95th percentile of the nonzero values of a map, or ``None`` for an all-zero map."""
    nonzero = values[values != 0]
    if nonzero.size == 0:
        return None
    return float(np.percentile(nonzero, DEFAULT_THRESHOLD_PERCENTILE))


def choose_slices(
    values: np.ndarray, n_slices: int, threshold: float | None, foreground: np.ndarray | None = None
) -> list[int]:
    """Axial slice indices where a ``(D, H, W)`` map is highest, spread out, sorted by position.

    Slices holding values above ``threshold`` are ranked by the sum of their top 0.5 %
    values and taken greedily, at least ``depth / (2 n_slices)`` slices apart; the rest
    are filled by farthest-point sampling inside the ``foreground`` (the head's
    slice range), so an all-zero map gives evenly spaced slices.
    """
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
        scores = np.partition(flat, flat.shape[1] - top, axis=1)[:, -top:].sum(axis=1, dtype=np.float64)
        has_overlay = (flat > threshold).any(axis=1)
        for index in np.argsort(-scores, kind="stable"):
            if len(chosen) == n_slices:
                break
            if has_overlay[index] and all(abs(int(index) - c) >= separation for c in chosen):
                chosen.append(int(index))

    if not chosen:
        chosen = sorted({int(round(z)) for z in np.linspace(first, last, n_slices + 2)[1:-1]})
    candidates = np.arange(first, last + 1)
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


def _check_grid(image: sitk.Image, reference: sitk.Image, path: Path, reference_path: Path) -> None:
    if not same_grid(image, reference):
        raise InputError(f"{path}: not on the grid of {reference_path} ({grid_difference(image, reference)})")


def _grey_window(array: np.ndarray) -> tuple[float, float]:
    """Robust (1st, 99th) percentile window of the nonzero voxels (a strided sample when large)."""
    stride = max(1, int(round((array.size / 2_000_000) ** (1 / 3))))
    sample = array[::stride, ::stride, ::stride]
    sample = sample[sample != 0]
    if sample.size == 0:
        sample = array[array != 0]
    low, high = (float(v) for v in np.percentile(sample, WINDOW_PERCENTILES))
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    if high <= low:
        high = low + 1.0
    return low, high


def _crop_box(
    foreground: np.ndarray, values: np.ndarray, threshold: float | None, outline: np.ndarray | None
) -> tuple[slice, slice]:
    """In-plane (rows, columns) box around the head, the overlay and the label, plus a margin."""
    keep = foreground.any(axis=0)
    if threshold is not None:
        keep |= (values > threshold).any(axis=0)
    if outline is not None:
        keep |= outline.any(axis=0)
    if not keep.any():
        return slice(None), slice(None)
    boxes = []
    for axis in (1, 0):
        inside = np.flatnonzero(keep.any(axis=axis))
        start = max(0, int(inside[0]) - CROP_MARGIN_VOXELS)
        stop = min(keep.shape[1 - axis], int(inside[-1]) + 1 + CROP_MARGIN_VOXELS)
        boxes.append(slice(start, stop))
    return boxes[0], boxes[1]


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
    slices: list[int],
    window: tuple[float, float],
    threshold: float | None,
    crop: tuple[slice, slice],
    title: str,
) -> Figure:
    """Build the montage Figure (grid of square panels, colour bar on the right, title on top)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n_columns = min(len(slices), max(MAX_COLUMNS, math.ceil(math.sqrt(len(slices)))))
    n_rows = math.ceil(len(slices) / n_columns)
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
    spacing_x, spacing_y = scan.GetSpacing()[0], scan.GetSpacing()[1]
    rows, columns = crop
    centre = (scan.GetSize()[0] // 2, scan.GetSize()[1] // 2)

    for panel, z in enumerate(slices):
        row, column = divmod(panel, n_columns)
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
        axes.imshow(
            scan_array[z, rows, columns],
            cmap="gray",
            vmin=window[0],
            vmax=window[1],
            aspect=spacing_y / spacing_x,
            interpolation="bilinear",
        )
        if shows_overlay:
            shown = np.ma.masked_less_equal(values[z, rows, columns], threshold)
            if shown.count():
                axes.imshow(
                    shown, cmap=cmap, norm=norm, alpha=OVERLAY_ALPHA, aspect=spacing_y / spacing_x, interpolation="nearest"
                )
        if outline is not None and outline[z, rows, columns].any():
            axes.contour(
                outline[z, rows, columns].astype(np.float32), levels=[0.5], colors=CONTOUR_COLOUR, linewidths=1.2
            )
        position = scan.TransformIndexToPhysicalPoint((centre[0], centre[1], int(z)))[2]
        axes.text(
            0.03, 0.03, f"z {position:+.1f} mm", transform=axes.transAxes, color="white", fontsize=9,
            ha="left", va="bottom", bbox=TEXT_BOX,
        )
        if panel == 0:
            for x, letter in ((0.02, "R"), (0.98, "L")):
                axes.text(x, 0.5, letter, transform=axes.transAxes, color="#bbbbbb", fontsize=10,
                          ha="left" if letter == "R" else "right", va="center", fontweight="bold", bbox=TEXT_BOX)
            axes.text(0.5, 0.98, "A", transform=axes.transAxes, color="#bbbbbb", fontsize=10,
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
        caption = "anomaly score\n(map all zero: no overlay)"
    elif not shows_overlay:
        caption = f"anomaly score (map units)\nnothing above {threshold:.3g}"
    else:
        caption = f"anomaly score (map units)\nshown above {threshold:.3g}"
    colorbar.set_label(caption, color="white", fontsize=9)
    colorbar.ax.tick_params(colors="white", labelsize=8)
    colorbar.outline.set_edgecolor("white")
    if outline is not None:
        figure.legend(
            handles=[Line2D([], [], color=CONTOUR_COLOUR, linewidth=1.5, label="lesion label")],
            loc="lower right", frameon=False, labelcolor="white", fontsize=8,
        )
    return figure
