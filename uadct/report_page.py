"""The cohort HTML page of ``uadct heatmap --html``: every subject's montage in one self-contained file.

Maps, scans and labels are matched by subject id; each montage comes from
:func:`uadct.report.heatmap_montage` and is embedded as a base64 PNG. A bad subject is
listed on the page with its error and the others go on.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from uadct.errors import InputError, UadctError
from uadct.io import list_niftis, strip_nifti_suffix, write_text
from uadct.report import DEFAULT_SLICES, DPI, heatmap_montage

log = logging.getLogger(__name__)


@dataclass
class HtmlResult:
    """What :func:`render_html` wrote: the page, the subjects drawn and (id, message) of those that failed."""

    path: Path
    subjects: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)


def render_html(
    scans_dir: str | Path,
    maps_dir: str | Path,
    out_html: str | Path,
    labels_dir: str | Path | None = None,
    n_slices: int = DEFAULT_SLICES,
    threshold: float | None = None,
    resample: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> HtmlResult:
    """One self-contained HTML page with the montage of every map in ``maps_dir`` over its scan.

    Maps and scans (and labels, when a folder is given) are matched by subject id
    (``<id>.nii[.gz]``). Images are embedded as base64 PNG, so the page is a single file.
    A subject whose files are bad is listed on the page with its error and the others go
    on; maps without a scan are listed too. ``progress(done, total, id)`` after each one.
    Raises :class:`InputError` when no map has a scan of the same name.
    """
    scans_dir, maps_dir, out_html = Path(scans_dir), Path(maps_dir), Path(out_html)
    scans = {strip_nifti_suffix(p): p for p in list_niftis(scans_dir)}
    maps = {strip_nifti_suffix(p): p for p in list_niftis(maps_dir)}
    labels = {strip_nifti_suffix(p): p for p in list_niftis(labels_dir)} if labels_dir is not None else {}
    subjects = sorted(set(maps) & set(scans))
    if not subjects:
        raise InputError(f"no map in {maps_dir} has a scan of the same name in {scans_dir}")
    failed = [(s, f"{maps[s]}: no scan named {s}.nii[.gz] in {scans_dir}") for s in sorted(set(maps) - set(scans))]
    sections: list[str] = []
    drawn: list[str] = []
    for done, subject in enumerate(subjects, start=1):
        label = labels.get(subject)
        try:
            montage = heatmap_montage(scans[subject], maps[subject], label, n_slices, threshold, subject, None, resample)
        except UadctError as exc:
            log.warning("%s: %s", subject, exc)
            failed.append((subject, str(exc)))
        else:
            buffer = io.BytesIO()
            montage.figure.savefig(buffer, format="png", dpi=DPI, facecolor=montage.figure.get_facecolor())
            encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
            details = f"map <code>{html.escape(str(maps[subject]))}</code>"
            details += f", label <code>{html.escape(str(label))}</code>" if label is not None else ", no label"
            sections.append(
                f'<section id="{html.escape(subject)}"><h2>{html.escape(subject)}</h2>'
                f"<p>{details}; {html.escape(montage.unit)}, shown above "
                f"{'n/a' if montage.threshold is None else format(montage.threshold, '.4g')}</p>"
                f'<img alt="heatmap of {html.escape(subject)}" src="data:image/png;base64,{encoded}"></section>'
            )
            drawn.append(subject)
        if progress is not None:
            progress(done, len(subjects), subject)
    index = " · ".join(f'<a href="#{html.escape(s)}">{html.escape(s)}</a>' for s in drawn)
    problems = "".join(f"<li><b>{html.escape(s)}</b>: {html.escape(e)}</li>" for s, e in failed)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>uadct heatmaps</title>"
        "<style>body{background:#111;color:#ddd;font-family:sans-serif;margin:1.5em}img{max-width:100%}"
        "a{color:#6cf}code{color:#aaa}section{margin-bottom:2em}</style></head><body>"
        f"<h1>Anomaly maps: {len(drawn)} subject(s)</h1>"
        f"<p>Scans <code>{html.escape(str(scans_dir))}</code>, maps <code>{html.escape(str(maps_dir))}</code>. "
        "Rows: axial, coronal, sagittal, radiological convention (patient's right on the viewer's left).</p>"
        f"<p>{index}</p>"
        + (f"<h2>Not drawn</h2><ul>{problems}</ul>" if failed else "")
        + "".join(sections)
        + "</body></html>\n"
    )
    write_text(page, out_html)
    return HtmlResult(out_html, drawn, failed)
