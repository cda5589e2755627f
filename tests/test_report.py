"""Heatmap montages built from the real SRI24 head at 2 mm with a blob map and a sphere label."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from uadct.errors import InputError, UadctError
from uadct.io import array_like, write_image
from uadct.report import (
    COLORBAR_INCHES,
    DEFAULT_SLICES,
    DPI,
    GENERIC_UNIT,
    PANEL_INCHES,
    TITLE_INCHES,
    VIEWS,
    choose_slices,
    heatmap_montage,
    map_unit,
    render_heatmap,
)
from uadct.report_page import render_html

BLOB_CENTRE_MM = (90.0, -110.0, 90.0)  # LPS point in the right hemisphere (the head spans x 0..239 mm)
BLOB_SIGMA_MM = 6.0
LABEL_RADIUS_MM = 10.0


@dataclass
class Case:
    """One subject (LPS-stored), its map and label on disk, and the in-memory images."""

    folder: Path
    subject: Path
    anomaly_map: Path
    label: Path
    head: sitk.Image
    map_image: sitk.Image
    label_image: sitk.Image


def _resample(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _squared_distance_mm(image: sitk.Image, point: tuple[float, float, float]) -> np.ndarray:
    """(D, H, W) squared distance in mm from each voxel centre to a physical point."""
    size = image.GetSize()
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in size[::-1]), indexing="ij")
    index = np.stack([xx, yy, zz], axis=-1)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    physical = np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T
    return ((physical - np.array(point)) ** 2).sum(axis=-1)


def _write_case(folder: Path, head: sitk.Image, map_image: sitk.Image, label_image: sitk.Image) -> Case:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_image(img, folder / name) for img, name in
             ((head, "subject.nii.gz"), (map_image, "map.nii.gz"), (label_image, "label.nii.gz"))]
    return Case(folder, *paths, head, map_image, label_image)


def _make_case(head: sitk.Image, folder: Path) -> Case:
    """A gaussian blob map (inside the head) and a sphere label around BLOB_CENTRE_MM on ``head``'s grid."""
    distance = _squared_distance_mm(head, BLOB_CENTRE_MM)
    inside = sitk.GetArrayViewFromImage(head) > 0
    blob = (np.exp(-distance / (2 * BLOB_SIGMA_MM**2)) * inside).astype(np.float32)
    sphere = (distance <= LABEL_RADIUS_MM**2).astype(np.uint8)
    return _write_case(folder, head, array_like(blob, head), array_like(sphere, head))


def _reoriented(case: Case, orientation: str, folder: Path) -> Case:
    images = [sitk.DICOMOrient(img, orientation) for img in (case.head, case.map_image, case.label_image)]
    return _write_case(folder, *images)


def _flip_to_ras(image: sitk.Image) -> sitk.Image:
    """The same voxels stored x- and y-flipped (RAS), built by hand rather than with DICOMOrient."""
    array = sitk.GetArrayFromImage(image)[:, ::-1, ::-1].copy()
    flipped = sitk.GetImageFromArray(array)
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetDirection(tuple((np.array(image.GetDirection()).reshape(3, 3) @ np.diag([-1.0, -1.0, 1.0])).ravel()))
    size = image.GetSize()
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((size[0] - 1, size[1] - 1, 0)))
    return flipped


@pytest.fixture(scope="module")
def case(atlas, tmp_path_factory) -> Case:
    """The SRI24 head with skull at 2 mm, stored LPS (the atlas itself is stored LAS)."""
    head = sitk.DICOMOrient(_resample(atlas.head, (2.0, 2.0, 2.0)), "LPS")
    return _make_case(head, tmp_path_factory.mktemp("report") / "lps")


@pytest.fixture(scope="module")
def rendered(case) -> Path:
    return render_heatmap(case.subject, case.anomaly_map, case.folder / "out" / "heatmap.png", label=case.label)


def _pixels(path: Path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image[..., :3]


def _panel_region(pixels: np.ndarray, n_columns: int) -> np.ndarray:
    """The montage panels only (without the title strip and the colour bar)."""
    return pixels[int(TITLE_INCHES * DPI):, : int(n_columns * PANEL_INCHES * DPI)]


def _overlay_pixels(pixels: np.ndarray) -> int:
    """Pixels clearly red/orange (the hot overlay), which grey anatomy never is."""
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(np.count_nonzero((red > 0.5) & (red - blue > 0.3) & (red - green > 0.15)))


def _contour_pixels(pixels: np.ndarray) -> int:
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(np.count_nonzero((blue > 0.6) & (green > 0.5) & (red < 0.3)))


def test_writes_a_valid_png_of_the_expected_size(rendered, case):
    assert rendered == case.folder / "out" / "heatmap.png"
    pixels = _pixels(rendered)
    columns, rows = DEFAULT_SLICES, len(VIEWS)  # one row per view
    expected = (round((rows * PANEL_INCHES + TITLE_INCHES) * DPI), round((columns * PANEL_INCHES + COLORBAR_INCHES) * DPI))
    assert pixels.shape[:2] == expected
    panels = _panel_region(pixels, columns)
    assert panels.std() > 0.1  # anatomy, not a blank canvas
    assert _overlay_pixels(panels) > 500
    assert _contour_pixels(panels) > 50
    assert sorted(p.name for p in rendered.parent.iterdir()) == ["heatmap.png"]  # no temporary file left


def test_chosen_slices_include_the_blob(case):
    display = sitk.DICOMOrient(case.map_image, "LPS")
    values = sitk.GetArrayFromImage(display)
    blob_slice = display.TransformPhysicalPointToIndex(BLOB_CENTRE_MM)[2]
    head = sitk.GetArrayFromImage(sitk.DICOMOrient(case.head, "LPS")) > 50
    slices = choose_slices(values, 12, float(np.percentile(values[values > 0], 95)), head)
    assert blob_slice in slices
    assert slices == sorted(set(slices)) and len(slices) == 12
    occupied = np.flatnonzero(head.any(axis=(1, 2)))
    assert occupied[0] <= slices[0] and slices[-1] <= occupied[-1]


def test_zero_map_gives_evenly_spaced_slices():
    values = np.zeros((50, 8, 8), np.float32)
    foreground = np.zeros_like(values, bool)
    foreground[10:40] = True
    slices = choose_slices(values, 4, None, foreground)
    assert slices == [16, 22, 27, 33]  # np.linspace(10, 39, 6)[1:-1] rounded
    assert choose_slices(values, 80, None, foreground) == list(range(50))


def test_map_on_another_grid_raises_and_writes_nothing(case, tmp_path):
    coarse = _resample(case.map_image, (3.0, 3.0, 3.0))
    wrong_map = write_image(coarse, tmp_path / "map_3mm.nii.gz")
    out = tmp_path / "out" / "heatmap.png"
    with pytest.raises(InputError, match=r"map_3mm\.nii\.gz.*size.*spacing"):
        render_heatmap(case.subject, wrong_map, out)
    shifted = sitk.Image(case.label_image)
    shifted.SetOrigin(tuple(o + 5.0 for o in shifted.GetOrigin()))
    wrong_label = write_image(shifted, tmp_path / "label_shifted.nii.gz")
    with pytest.raises(InputError, match=r"label_shifted\.nii\.gz.*origin"):
        render_heatmap(case.subject, case.anomaly_map, out, label=wrong_label)
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_orientation_does_not_change_the_picture(case, rendered, tmp_path):
    ras = _write_case(tmp_path / "ras", *(_flip_to_ras(img) for img in (case.head, case.map_image, case.label_image)))
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ras.head.GetDirection()) == "RAS"
    permuted = _reoriented(case, "SPR", tmp_path / "spr")  # axes stored in another order
    reference = _pixels(rendered)
    for other in (ras, permuted):
        png = render_heatmap(other.subject, other.anomaly_map, other.folder / "out" / "heatmap.png", label=other.label)
        pixels = _pixels(png)
        assert pixels.shape == reference.shape
        assert np.abs(pixels - reference).mean() < 1e-3, other.folder.name


def test_anisotropic_voxels_keep_the_head_shape(atlas, tmp_path):
    """A 2 x 4 x 2 mm scan shows the head with the same proportions as a 2 mm one."""

    def head_aspect(spacing: tuple[float, float, float], name: str) -> float:
        head = sitk.DICOMOrient(_resample(atlas.head, spacing), "LPS")
        subject = write_image(head, tmp_path / name / "subject.nii.gz")
        zeros = write_image(array_like(np.zeros(head.GetSize()[::-1], np.float32), head), tmp_path / name / "map.nii.gz")
        pixels = _panel_region(_pixels(render_heatmap(subject, zeros, tmp_path / name / "h.png", n_slices=2)), 2)
        panel = int(PANEL_INCHES * DPI)
        # the second panel (no R/L/A letters), above its "z ... mm" caption
        bright = pixels[: int(0.9 * panel), panel:, :].mean(axis=2) > 0.15
        rows = np.flatnonzero(bright.sum(axis=1) >= 3)
        columns = np.flatnonzero(bright.sum(axis=0) >= 3)
        return (rows[-1] - rows[0]) / (columns[-1] - columns[0])

    isotropic = head_aspect((2.0, 2.0, 2.0), "iso")
    assert 1.1 < isotropic < 1.4  # a head is longer front to back than side to side
    assert head_aspect((2.0, 4.0, 2.0), "aniso") == pytest.approx(isotropic, rel=0.05)


def test_all_zero_map_renders_without_overlay(case, tmp_path):
    zeros = write_image(array_like(np.zeros(case.head.GetSize()[::-1], np.float32), case.head), tmp_path / "zeros.nii.gz")
    png = render_heatmap(case.subject, zeros, tmp_path / "zeros.png", n_slices=5, title="no findings")
    pixels = _pixels(png)
    assert pixels.shape[:2] == (round((3 * PANEL_INCHES + TITLE_INCHES) * DPI), round((5 * PANEL_INCHES + COLORBAR_INCHES) * DPI))
    panels = _panel_region(pixels, 5)
    assert panels.std() > 0.1
    assert _overlay_pixels(panels) == 0


def test_threshold_above_the_map_shows_no_overlay(case, tmp_path):
    png = render_heatmap(case.subject, case.anomaly_map, tmp_path / "high.png", n_slices=4, threshold=2.0)
    assert _overlay_pixels(_panel_region(_pixels(png), 4)) == 0


def test_bad_arguments_raise(case, tmp_path):
    with pytest.raises(UadctError, match="n_slices"):
        render_heatmap(case.subject, case.anomaly_map, tmp_path / "x.png", n_slices=0)
    with pytest.raises(UadctError, match="threshold"):
        render_heatmap(case.subject, case.anomaly_map, tmp_path / "x.png", threshold=float("nan"))
    with pytest.raises(InputError, match="missing.nii.gz"):
        render_heatmap(tmp_path / "missing.nii.gz", case.anomaly_map, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_leaves_no_pyplot_figures(case, tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    render_heatmap(case.subject, case.anomaly_map, tmp_path / "y.png", n_slices=2)
    assert plt.get_fignums() == before


def test_display_is_radiological_with_anterior_at_the_top(case, tmp_path):
    """A blob in the right frontal lobe lands in the upper-left quadrant of its panel."""
    right_anterior = (80.0, -170.0, 80.0)  # LPS mm: x 40 mm right of the midline, y 50 mm anterior
    blob = np.exp(-_squared_distance_mm(case.head, right_anterior) / (2 * BLOB_SIGMA_MM**2)).astype(np.float32)
    ras = _flip_to_ras(array_like(blob, case.head))
    for name, subject, map_image in (("lps", case.head, array_like(blob, case.head)), ("ras", _flip_to_ras(case.head), ras)):
        subject_path = write_image(subject, tmp_path / name / "subject.nii.gz")
        map_path = write_image(map_image, tmp_path / name / "map.nii.gz")
        pixels = _panel_region(_pixels(render_heatmap(subject_path, map_path, tmp_path / name / "h.png", n_slices=1)), 1)
        panel = int(PANEL_INCHES * DPI)
        red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
        overlay = (red > 0.5) & (red - blue > 0.3) & (red - green > 0.15)
        axial, coronal, sagittal = (overlay[row * panel:(row + 1) * panel] for row in range(3))
        rows, columns = np.nonzero(axial)
        assert rows.size > 50, name
        assert rows.mean() < 0.45 * panel and columns.mean() < 0.45 * panel, name  # right + anterior: upper left
        assert np.nonzero(coronal)[1].mean() < 0.45 * panel, name  # right: left half
        assert np.nonzero(sagittal)[1].mean() < 0.45 * panel, name  # anterior: left half


def test_each_view_shows_the_slice_holding_the_map_maximum(case):
    montage = heatmap_montage(case.subject, case.anomaly_map, n_slices=4)
    display = sitk.DICOMOrient(case.map_image, "LPS")
    peak = np.unravel_index(np.argmax(sitk.GetArrayViewFromImage(display)), display.GetSize()[::-1])  # (z, y, x)
    assert montage.slices["axial"].count(int(peak[0])) == 1
    assert montage.slices["coronal"].count(int(peak[1])) == 1
    assert montage.slices["sagittal"].count(int(peak[2])) == 1
    assert all(len(s) == 4 and s == sorted(s) for s in montage.slices.values())


def test_resample_puts_a_map_from_another_grid_on_the_scan(case, tmp_path):
    coarse = write_image(_resample(case.map_image, (3.0, 3.0, 3.0)), tmp_path / "map_3mm.nii.gz")
    label = write_image(sitk.Cast(_resample(sitk.Cast(case.label_image, sitk.sitkFloat32), (3.0, 3.0, 3.0)) > 0.5,
                                  sitk.sitkUInt8), tmp_path / "label_3mm.nii.gz")
    montage = heatmap_montage(case.subject, coarse, label=label, n_slices=4, resample=True)
    display = sitk.DICOMOrient(case.map_image, "LPS")
    blob = display.TransformPhysicalPointToIndex(BLOB_CENTRE_MM)  # (x, y, z) on the scan's grid
    assert blob[2] in montage.slices["axial"] and blob[0] in montage.slices["sagittal"]
    png = render_heatmap(case.subject, coarse, tmp_path / "coarse.png", label=label, n_slices=4, resample=True)
    panels = _panel_region(_pixels(png), 4)
    assert _overlay_pixels(panels) > 500 and _contour_pixels(panels) > 50

    far = sitk.Image(case.map_image)
    far.SetOrigin(tuple(o + 1000.0 for o in far.GetOrigin()))
    far_path = write_image(far, tmp_path / "far.nii.gz")
    with pytest.raises(InputError, match=r"far\.nii\.gz.*does not overlap"):
        render_heatmap(case.subject, far_path, tmp_path / "far.png", resample=True)
    assert not (tmp_path / "far.png").exists()


def test_colour_bar_unit_comes_from_the_score_sidecar(tmp_path):
    map_path = tmp_path / "sub-1.nii.gz"
    assert map_unit(map_path) == GENERIC_UNIT
    (tmp_path / "sub-1.json").write_text('{"model": "ganomaly", "output_kind": "scalar", "mood_scaling": null}')
    assert map_unit(map_path) == "anomaly score (ganomaly, scalar output)"
    (tmp_path / "sub-1.json").write_text('{"model": "vae", "mood_scaling": "per-case min-max inside the brain"}')
    assert map_unit(map_path) == "anomaly score (0-1, MOOD scaling)"
    (tmp_path / "sub-1.json").write_text('{"unit": "MAD units"}')
    assert map_unit(map_path) == "MAD units"
    (tmp_path / "sub-1.json").write_text("not json")
    assert map_unit(map_path) == GENERIC_UNIT


def test_html_page_embeds_every_subject_and_lists_the_bad_ones(case, tmp_path):
    import base64
    import re
    import shutil

    scans, maps, labels = tmp_path / "scans", tmp_path / "maps", tmp_path / "labels"
    for folder in (scans, maps, labels):
        folder.mkdir()
    for name in ("sub-1", "sub-2", "sub-bad"):
        shutil.copy(case.subject, scans / f"{name}.nii.gz")
    for name in ("sub-1", "sub-2", "sub-orphan"):
        shutil.copy(case.anomaly_map, maps / f"{name}.nii.gz")
    shutil.copy(case.label, labels / "sub-1.nii.gz")
    write_image(_resample(case.map_image, (3.0, 3.0, 3.0)), maps / "sub-bad.nii.gz")  # another grid
    calls = []
    result = render_html(scans, maps, tmp_path / "page.html", labels_dir=labels, n_slices=2,
                         progress=lambda *a: calls.append(a))
    assert result.subjects == ["sub-1", "sub-2"]
    assert [s for s, _ in result.failed] == ["sub-orphan", "sub-bad"]
    assert calls[-1] == (3, 3, "sub-bad")
    page = result.path.read_text(encoding="utf-8")
    for name in ("sub-1", "sub-2", "sub-bad", "sub-orphan"):
        assert name in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2
    assert all(base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    assert "sub-bad.nii.gz: not on the grid" in page and "label" in page


@pytest.mark.slow


def test_cli_heatmap_png_and_html_exit_codes(case, tmp_path):
    import shutil
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "uadct", "heatmap", *args], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)

    png = tmp_path / "one.png"
    done = run(str(case.subject), str(case.anomaly_map), "-o", str(png), "--label", str(case.label), "--slices", "3",
               "--threshold", "0.2", "--unit", "test units")
    assert done.returncode == 0, done.stderr
    assert png.stat().st_size > 50_000 and _overlay_pixels(_panel_region(_pixels(png), 3)) > 200

    scans, maps = tmp_path / "scans", tmp_path / "maps"
    scans.mkdir()
    maps.mkdir()
    for name in ("a", "b"):
        shutil.copy(case.subject, scans / f"{name}.nii.gz")
    shutil.copy(case.anomaly_map, maps / "a.nii.gz")
    write_image(_resample(case.map_image, (3.0, 3.0, 3.0)), maps / "b.nii.gz")
    page = tmp_path / "page.html"
    partly = run("--html", str(scans), str(maps), "-o", str(page), "--slices", "2")
    assert partly.returncode == 1 and "b" in partly.stderr and "Traceback" not in partly.stderr
    assert page.read_text(encoding="utf-8").count("data:image/png;base64,") == 1
    fixed = run("--html", str(scans), str(maps), "-o", str(page), "--slices", "2", "--resample")
    assert fixed.returncode == 0, fixed.stderr
    assert page.read_text(encoding="utf-8").count("data:image/png;base64,") == 2
