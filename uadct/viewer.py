"""An interactive, self-contained viewer page: NiiVue with the scans, maps and lesion outlines embedded.

:func:`write_viewer` writes one HTML file that needs nothing else when opened, not even a
network connection: the NiiVue bundle (BSD-2, shipped gzip-compressed in
``uadct/viewer_assets`` with its licence) is inlined, and every subject's volumes are
base64-embedded NIfTI files on the scan's grid:

- the scan as a display copy: 256 grey levels over its 1st-99th percentile window (uint8);
- the anomaly map as it is (float32, so the threshold slider works in the map's units);
- the lesion outline: the boundary voxels of the label (the label less its 6-connected
  erosion), drawn in cyan.

The page shows the three planes and a 3D render (NiiVue's multiplanar layout) in
radiological convention, the crosshair on the map's maximum, with a subject list, a threshold slider (voxels below it are
transparent; default the 95th percentile of the map's nonzero values, as the PNG
montage), an opacity slider, an outline switch and the value under the crosshair. A
Content-Security-Policy forbids the page any network request. Only the chosen subject's
volumes are decoded, so a page with many subjects opens as fast as one with one.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uadct.errors import InputError, UadctError
from uadct.io import list_niftis, read_image, read_mask, strip_nifti_suffix, write_text

log = logging.getLogger(__name__)

NIIVUE_VERSION = "0.69.0"
NIIVUE_BUNDLE = "niivue.umd.js.gz"
NIIVUE_LICENCE = "NIIVUE-LICENSE.txt"
MAP_COLORMAP = "warm"  # NiiVue's red -> yellow: stands out on grey anatomy; cyan outline apart from it
OUTLINE_RGB = (0, 229, 255)  # the PNG montage's outline colour (#00e5ff)
MAP_OPACITY = 0.8
MAP_TOP_PERCENTILE = 99.9  # of the nonzero map values: the colour scale's upper end
WINDOW_PERCENTILES = (1.0, 99.0)  # grey window of the scan's display copy, over its nonzero voxels
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval' 'wasm-unsafe-eval' blob:; "
    "style-src 'unsafe-inline'; img-src data: blob:; connect-src data: blob:; worker-src blob:; font-src data:"
)


@dataclass
class ViewerSubject:
    """One subject's files: scan, map (on the scan's grid) and an optional lesion label."""

    name: str
    scan: Path
    anomaly_map: Path
    label: Path | None = None


@dataclass
class ViewerResult:
    """What :func:`write_viewer` wrote: the page, the subjects in it and (id, message) of those left out."""

    path: Path
    subjects: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)


def niivue_bundle() -> str:
    """The NiiVue UMD bundle's JavaScript (it defines the global ``niivue``)."""
    data = resources.files("uadct").joinpath("viewer_assets", NIIVUE_BUNDLE).read_bytes()
    return gzip.decompress(data).decode("utf-8")


def niivue_licence() -> str:
    """NiiVue's BSD-2 licence text, reproduced in every page that embeds the bundle."""
    return resources.files("uadct").joinpath("viewer_assets", NIIVUE_LICENCE).read_text(encoding="utf-8")


def match_subjects(scans_dir: str | Path, maps_dir: str | Path,
                   labels_dir: str | Path | None = None) -> tuple[list[ViewerSubject], list[tuple[str, str]]]:
    """Maps matched to scans (and labels) by subject id ``<id>.nii[.gz]``; maps without a scan are failures."""
    scans_dir, maps_dir = Path(scans_dir), Path(maps_dir)
    scans = {strip_nifti_suffix(p): p for p in list_niftis(scans_dir)}
    maps = {strip_nifti_suffix(p): p for p in list_niftis(maps_dir)}
    labels = {strip_nifti_suffix(p): p for p in list_niftis(labels_dir)} if labels_dir is not None else {}
    names = sorted(set(maps) & set(scans))
    if not names:
        raise InputError(f"no map in {maps_dir} has a scan of the same name in {scans_dir}")
    failed = [(s, f"{maps[s]}: no scan named {s}.nii[.gz] in {scans_dir}") for s in sorted(set(maps) - set(scans))]
    return [ViewerSubject(s, scans[s], maps[s], labels.get(s)) for s in names], failed


def write_viewer(
    subjects: list[ViewerSubject],
    out_html: str | Path,
    threshold: float | None = None,
    resample: bool = False,
    failed: list[tuple[str, str]] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> ViewerResult:
    """Write the interactive page for ``subjects`` to ``out_html`` (atomically).

    ``threshold`` fixes the initial threshold for every map (default: each map's 95th
    percentile of nonzero values). Map and label must lie on the scan's grid, or with
    ``resample`` they are resampled onto it (as :func:`uadct.report.render_heatmap`). A
    subject whose files are bad is listed on the page with its error and the others go
    on; ``failed`` adds earlier failures to that list. Raises :class:`InputError` when no
    subject could be embedded.
    """
    from uadct.report import default_threshold, map_unit

    out_html = Path(out_html)
    failed = list(failed or [])
    embedded: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="uadct-viewer-") as scratch:
        for done, subject in enumerate(subjects, start=1):
            try:
                embedded.append(_embed_subject(subject, Path(scratch), threshold, resample, default_threshold, map_unit))
            except UadctError as exc:
                log.warning("%s: %s", subject.name, exc)
                failed.append((subject.name, str(exc)))
            if progress is not None:
                progress(done, len(subjects), subject.name)
    if not embedded:
        raise InputError(f"{out_html}: no subject could be drawn ({failed[0][1] if failed else 'none given'})")
    write_text(_page(embedded, failed), out_html)
    return ViewerResult(out_html, [str(item["id"]) for item in embedded], failed)


def _embed_subject(subject: ViewerSubject, scratch: Path, threshold: float | None, resample: bool,
                   default_threshold: Callable[[np.ndarray], float | None], map_unit: Callable[[Path], str]) -> dict[str, object]:
    """One subject's volumes as base64 NIfTI and its display settings."""
    from uadct.report import _on_grid  # the one rule for "on the scan's grid, or resampled onto it"

    scan = read_image(subject.scan)
    anomaly_map = _on_grid(read_image(subject.anomaly_map, allow_empty=True), scan, subject.anomaly_map, subject.scan,
                           resample, False)
    values = sitk.GetArrayViewFromImage(anomaly_map).astype(np.float32)
    if not np.isfinite(values).all():
        raise InputError(f"{subject.anomaly_map}: the map holds NaN or infinite values")
    nonzero = values[values != 0]
    start = threshold if threshold is not None else default_threshold(values)
    low, high = (float(nonzero.min()), float(np.percentile(nonzero, MAP_TOP_PERCENTILE))) if nonzero.size else (0.0, 1.0)
    top = float(nonzero.max()) if nonzero.size else 1.0
    if high <= low:
        high = max(top, low + 1e-6)
    peak = np.unravel_index(int(np.argmax(values)), values.shape)  # (z, y, x) array index
    point = anomaly_map.TransformIndexToPhysicalPoint([int(peak[2]), int(peak[1]), int(peak[0])])  # LPS mm
    entry: dict[str, object] = {
        "id": subject.name,
        "peak_ras_mm": [-point[0], -point[1], point[2]],  # NiiVue works in RAS
        "scan": _nifti_base64(_display_copy(scan), scratch / "scan.nii.gz"),
        "map": _nifti_base64(sitk.Cast(anomaly_map, sitk.sitkFloat32), scratch / "map.nii.gz"),
        "label": None,
        "threshold": float(start) if start is not None else low,
        "colour_max": high,
        "range": [low, float(np.nextafter(np.float32(max(top, high)), np.float32(np.inf)))],  # at its end nothing shows
        "unit": map_unit(subject.anomaly_map),
        "files": {"scan": str(subject.scan), "map": str(subject.anomaly_map),
                  "label": str(subject.label) if subject.label is not None else None},
    }
    if subject.label is not None:
        label = _on_grid(read_mask(subject.label), scan, subject.label, subject.scan, resample, True)
        entry["label"] = _nifti_base64(_outline(label), scratch / "label.nii.gz")
    return entry


def _display_copy(scan: sitk.Image) -> sitk.Image:
    """The scan as uint8 grey levels over its 1st-99th percentile window of nonzero voxels (same grid)."""
    array = sitk.GetArrayViewFromImage(scan).astype(np.float32)
    sample = array[array != 0]
    if sample.size == 0:
        sample = array.reshape(-1)
    low, high = (float(v) for v in np.percentile(sample, WINDOW_PERCENTILES))
    if high <= low:
        low, high = float(sample.min()), float(sample.max()) + 1e-6
    grey = np.clip((array - low) / (high - low), 0.0, 1.0) * 255.0
    image = sitk.GetImageFromArray(np.rint(grey).astype(np.uint8))
    image.CopyInformation(scan)
    return image


def _outline(label: sitk.Image) -> sitk.Image:
    """Boundary voxels of a binary label: the label less its 6-connected erosion (uint8 0/1, same grid)."""
    from scipy import ndimage

    inside = sitk.GetArrayViewFromImage(label) > 0
    border = inside & ~ndimage.binary_erosion(inside, structure=ndimage.generate_binary_structure(3, 1))
    image = sitk.GetImageFromArray(border.astype(np.uint8))
    image.CopyInformation(label)
    return image


def _nifti_base64(image: sitk.Image, scratch_file: Path) -> str:
    """A gzipped NIfTI of ``image`` (its geometry kept) as base64 text."""
    sitk.WriteImage(image, str(scratch_file), useCompression=True)
    encoded = base64.b64encode(scratch_file.read_bytes()).decode("ascii")
    scratch_file.unlink()
    return encoded


def _script_json(data: object) -> str:
    """JSON safe inside a ``<script>`` element (no ``</`` that could close it)."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def _page(subjects: list[dict[str, object]], failed: list[tuple[str, str]]) -> str:
    problems = "".join(f"<li><b>{html.escape(s)}</b>: {html.escape(e)}</li>" for s, e in failed)
    data = {"subjects": subjects, "outline_rgb": list(OUTLINE_RGB), "map_colormap": MAP_COLORMAP, "map_opacity": MAP_OPACITY}
    licence = html.escape(niivue_licence())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CONTENT_SECURITY_POLICY}\">"
        "<title>uadct viewer</title><style>" + _STYLE + "</style></head>"
        "<body data-state=\"loading\"><div id=\"side\"><h1>uadct viewer</h1>"
        f"<p class=\"small\">{len(subjects)} subject(s). Radiological convention (patient's right on the viewer's left). "
        "Click a view to move the crosshair; scroll to change the slice.</p>"
        "<ul id=\"subjects\"></ul>"
        "<label>threshold <span id=\"threshold-value\"></span><input id=\"threshold\" type=\"range\" min=\"0\" max=\"1\" step=\"any\"></label>"
        "<label>opacity <span id=\"opacity-value\"></span><input id=\"opacity\" type=\"range\" min=\"0\" max=\"1\" step=\"0.05\"></label>"
        "<label><input id=\"outline\" type=\"checkbox\" checked> lesion outline (cyan)</label>"
        "<p id=\"unit\" class=\"small\"></p><p id=\"location\" class=\"small\"></p><p id=\"status\" class=\"small\">loading</p>"
        + (f"<h2>Not drawn</h2><ul class=\"small\">{problems}</ul>" if failed else "")
        + f"<details class=\"small\"><summary>NiiVue {NIIVUE_VERSION} licence</summary><pre>{licence}</pre></details>"
        "</div><div id=\"view\"><canvas id=\"gl\"></canvas></div>"
        f"<script type=\"application/json\" id=\"uadct-data\">{_script_json(data)}</script>"
        "<script>" + niivue_bundle().replace("</script", "<\\/script") + "</script>"
        "<script>" + _SCRIPT + "</script></body></html>\n"
    )


_STYLE = (
    "html,body{margin:0;height:100%;background:#111;color:#ddd;font-family:sans-serif}"
    "body{display:flex}#side{width:280px;padding:12px;overflow:auto;box-sizing:border-box}"
    "#view{flex:1;position:relative}#gl{position:absolute;inset:0;width:100%;height:100%}"
    "h1{font-size:18px;margin:0 0 8px}h2{font-size:15px}.small{font-size:12px;color:#aaa}"
    "label{display:block;margin:10px 0}input[type=range]{width:100%}"
    "#subjects{list-style:none;padding:0;max-height:40vh;overflow:auto}"
    "#subjects button{width:100%;text-align:left;background:#222;color:#ddd;border:1px solid #333;padding:4px;cursor:pointer}"
    "#subjects button.active{background:#345;border-color:#6cf}pre{white-space:pre-wrap}"
)

_SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('uadct-data').textContent);
  const status = (text, state) => {
    document.getElementById('status').textContent = text;
    if (state) document.body.dataset.state = state;
  };
  let nv;
  try {
    nv = new niivue.Niivue({backColor: [0, 0, 0, 1], show3Dcrosshair: true, isColorbar: true,
                            crosshairColor: [0.3, 0.9, 0.3, 1], dragAndDropEnabled: false});
    nv.attachTo('gl');
    nv.setRadiologicalConvention(true);
    nv.setSliceType(nv.sliceTypeMultiplanar);
    const [r, g, b] = data.outline_rgb;
    nv.addColormap('uadct_outline', {R: [0, r], G: [0, g], B: [0, b], A: [0, 255], I: [0, 255]});
  } catch (error) {
    status('this browser cannot draw the viewer (WebGL2 needed): ' + error, 'error');
    return;
  }
  const threshold = document.getElementById('threshold');
  const opacity = document.getElementById('opacity');
  const outline = document.getElementById('outline');
  opacity.value = data.map_opacity;
  let current = -1;
  nv.onLocationChange = (location) => {
    if (!location || !location.mm) return;
    const mm = Array.from(location.mm).slice(0, 3).map((v) => v.toFixed(1)).join(', ');
    const value = location.values && location.values[1] ? Number(location.values[1].value).toPrecision(4) : '-';
    document.getElementById('location').textContent = 'crosshair ' + mm + ' mm (RAS); map ' + value;
  };
  const mapVolume = () => nv.volumes[1];
  const showValues = () => {
    document.getElementById('threshold-value').textContent = Number(threshold.value).toPrecision(4);
    document.getElementById('opacity-value').textContent = Number(opacity.value).toFixed(2);
  };
  threshold.addEventListener('input', () => {
    if (!mapVolume()) return;
    mapVolume().cal_min = Number(threshold.value);
    // NiiVue draws voxels above cal_max in the top colour: keep cal_max above the threshold
    mapVolume().cal_max = Math.max(data.subjects[current].colour_max, Number(threshold.value) * (1 + 1e-6) + 1e-12);
    nv.updateGLVolume();
    showValues();
  });
  opacity.addEventListener('input', () => {
    if (mapVolume()) nv.setOpacity(1, Number(opacity.value));
    showValues();
  });
  outline.addEventListener('change', () => {
    if (nv.volumes.length > 2) nv.setOpacity(2, outline.checked ? 1 : 0);
  });
  async function show(index) {
    if (index === current) return;
    current = index;
    const subject = data.subjects[index];
    status('loading ' + subject.id, 'loading');
    document.querySelectorAll('#subjects button').forEach((button, i) => button.classList.toggle('active', i === index));
    try {
      while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
      const scan = await niivue.NVImage.loadFromBase64({base64: subject.scan, name: subject.id + '_scan.nii.gz',
                                                         colormap: 'gray', cal_min: 0, cal_max: 255, trustCalMinMax: true,
                                                         colorbarVisible: false});
      nv.addVolume(scan);
      const map = await niivue.NVImage.loadFromBase64({base64: subject.map, name: subject.id + '_map.nii.gz',
                                                        colormap: data.map_colormap, opacity: Number(opacity.value),
                                                        cal_min: subject.threshold, cal_max: subject.colour_max,
                                                        trustCalMinMax: true});
      nv.addVolume(map);
      if (subject.label) {
        const label = await niivue.NVImage.loadFromBase64({base64: subject.label, name: subject.id + '_outline.nii.gz',
                                                            colormap: 'uadct_outline', opacity: outline.checked ? 1 : 0,
                                                            cal_min: 0.5, cal_max: 1, trustCalMinMax: true, colorbarVisible: false});
        nv.addVolume(label);
      }
      map.cal_min = subject.threshold;
      map.cal_max = subject.colour_max;
      nv.updateGLVolume();
      threshold.min = subject.range[0];
      threshold.max = subject.range[1];
      threshold.value = subject.threshold;
      document.getElementById('unit').textContent = subject.unit + '; shown above the threshold';
      showValues();
      nv.scene.crosshairPos = nv.mm2frac(subject.peak_ras_mm);  // start at the map's maximum
      nv.drawScene();
      nv.createOnLocationChange();
      status(subject.id + ' drawn', 'drawn');
    } catch (error) {
      status(subject.id + ': ' + error, 'error');
    }
  }
  const list = document.getElementById('subjects');
  data.subjects.forEach((subject, i) => {
    const item = document.createElement('li');
    const button = document.createElement('button');
    button.textContent = subject.id;
    button.addEventListener('click', () => show(i));
    item.appendChild(button);
    list.appendChild(item);
  });
  const wanted = data.subjects.findIndex((s) => '#' + s.id === window.location.hash);
  show(wanted >= 0 ? wanted : 0);
})();
"""
