"""The heatmap of a 2D image: one overlay panel, the image as stored (row 0 at the top, column 0 on the left).

:func:`render_heatmap_2d` draws the map over its image where it exceeds a threshold
(default: the 95th percentile of its nonzero values), the lesion label as an outline, and
a colour bar naming the map's unit (from the score sidecar). Photos and radiographs carry
no patient orientation, so there are no orientation letters or radiological flip:
the picture is the file as any viewer shows it. :func:`uadct.report.render_heatmap`
sends one-slice scans here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uadct.errors import InputError
from uadct.io import atomic_path, grid_difference, read_image, read_mask, same_grid

PANEL_INCHES = 6.0  # the longer side of the image panel
COLORBAR_INCHES = 1.6
DPI = 100
OVERLAY_ALPHA = 0.65
CONTOUR_COLOUR = "#00e5ff"
THRESHOLD_PERCENTILE = 95.0
WINDOW_PERCENTILES = (1.0, 99.0)


def is_single_slice(image: sitk.Image) -> bool:
    """True for a 2D image read as a volume of one slice."""
    return image.GetDimension() == 3 and image.GetSize()[2] == 1


def _on_grid(image: sitk.Image, reference: sitk.Image, path: Path, reference_path: Path, resample: bool, label: bool) -> sitk.Image:
    if same_grid(image, reference):
        return image
    if not resample:
        raise InputError(f"{path}: not on the grid of {reference_path} ({grid_difference(image, reference)}); "
                         "pass --resample to resample it through its geometry")
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear, 0.0,
                         sitk.sitkUInt8 if label else sitk.sitkFloat32)


def _map_unit(anomaly_map: Path) -> str:
    """The colour-bar label from the map's score sidecar (as :func:`uadct.report.map_unit`)."""
    from uadct.scoremap import GENERIC_UNIT, ScoreSidecar

    try:
        sidecar = ScoreSidecar.read(anomaly_map)
    except InputError:
        return GENERIC_UNIT
    return sidecar.colour_bar_unit if sidecar is not None else GENERIC_UNIT


def render_heatmap_2d(subject: str | Path, anomaly_map: str | Path, out_png: str | Path, label: str | Path | None = None,
                      threshold: float | None = None, title: str | None = None, unit: str | None = None,
                      resample: bool = False) -> Path:
    """Write the overlay of ``anomaly_map`` on the 2D image ``subject`` to ``out_png`` (atomically); return its path."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    subject, anomaly_map = Path(subject), Path(anomaly_map)
    image = read_image(subject)
    values = sitk.GetArrayFromImage(_on_grid(read_image(anomaly_map, allow_empty=True), image, anomaly_map, subject,
                                             resample, False))[0]
    outline = None
    if label is not None:
        outline = sitk.GetArrayFromImage(_on_grid(read_mask(label), image, Path(label), subject, resample, True))[0] > 0
    picture = sitk.GetArrayFromImage(image)[0]
    nonzero = values[values != 0]
    if threshold is None and nonzero.size:
        threshold = float(np.percentile(nonzero, THRESHOLD_PERCENTILE))
    low, high = (float(v) for v in np.percentile(picture, WINDOW_PERCENTILES))
    if high <= low:
        low, high = float(picture.min()), float(picture.max()) + 1e-6
    sx, sy = image.GetSpacing()[:2]
    height_mm, width_mm = picture.shape[0] * sy, picture.shape[1] * sx
    scale = PANEL_INCHES / max(height_mm, width_mm)
    panel_w, panel_h = width_mm * scale, height_mm * scale
    figure = Figure(figsize=(panel_w + COLORBAR_INCHES, panel_h + 0.5), facecolor="black")
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, panel_w / (panel_w + COLORBAR_INCHES), panel_h / (panel_h + 0.5)))
    axes.set_axis_off()
    axes.imshow(picture, cmap="gray", vmin=low, vmax=high, aspect=sy / sx, interpolation="nearest")
    cmap = ListedColormap(colormaps["hot"](np.linspace(0.3, 0.92, 256)), name="hot_overlay")
    top = float(nonzero.max()) if nonzero.size else 1.0
    norm = Normalize(vmin=threshold if threshold is not None and threshold < top else 0.0, vmax=top)
    if threshold is not None:
        shown = np.ma.masked_where(values <= threshold, values)
        axes.imshow(shown, cmap=cmap, norm=norm, alpha=OVERLAY_ALPHA, aspect=sy / sx, interpolation="nearest")
    if outline is not None and outline.any():
        axes.contour(outline.astype(float), levels=[0.5], colors=CONTOUR_COLOUR, linewidths=1.2)
    figure.suptitle(subject.name if title is None else title, color="white", fontsize=11)
    total_w = panel_w + COLORBAR_INCHES
    colorbar_axes = figure.add_axes(((panel_w + 0.2) / total_w, 0.1, 0.18 / total_w, 0.7))
    colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=colorbar_axes)
    caption = unit if unit is not None else _map_unit(anomaly_map)
    if threshold is not None:
        caption += f"\nshown above {threshold:.3g}"
    colorbar.set_label(caption, color="white", fontsize=9)
    colorbar.ax.tick_params(colors="white", labelsize=8)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, facecolor=figure.get_facecolor())
    return out_png
