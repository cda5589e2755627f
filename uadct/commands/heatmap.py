"""`uadct heatmap`: PNG montage, cohort HTML page, or the interactive NiiVue viewer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from uadct.commands import _console as ui
from uadct.errors import InputError

def heatmap(
    subject: Path = typer.Argument(..., help="The subject's scan (the grid the map is drawn on); with --html a folder of scans."),
    anomaly_map: Path = typer.Argument(..., help="Map written by `uadct score`; with --html a folder of maps (<id>.nii.gz)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="./<map id>_heatmap.png; with --html ./heatmaps.html",
                                          help="PNG file to write (with --html: the HTML page)."),
    label: Optional[Path] = typer.Option(None, help="Lesion mask to outline (with --html: a folder of masks named like the maps)."),
    slices: int = typer.Option(6, help="Slices per view (rows: axial, coronal, sagittal)."),
    threshold: Optional[float] = typer.Option(None, help="Show the map only above this value (default: its 95th percentile)."),
    unit: Optional[str] = typer.Option(None, help="Colour-bar label (default: from the map's score sidecar)."),
    resample: bool = typer.Option(False, "--resample", help="Resample a map/label on another grid onto the scan through the affines."),
    as_html: bool = typer.Option(False, "--html", help="Draw every subject of the folders into one self-contained HTML page."),
    interactive: bool = typer.Option(False, "--interactive", help="Write an interactive NiiVue page (scroll, crosshair, threshold and opacity sliders) instead of pictures; no network needed to open it."),
) -> None:
    """Overlay the anomaly map on the scan: 3-view montage (radiological), colour bar, lesion outline."""
    from uadct.default_outputs import heatmap_output
    from uadct.outputs import check_output_file, refuse_overwriting_inputs
    from uadct.report import render_heatmap
    from uadct.report_page import render_html

    output = output or ui.announce(heatmap_output(anomaly_map, as_html))
    refuse_overwriting_inputs([output], [p for p in (subject, anomaly_map, label) if p is not None])
    check_output_file(output, "PNG" if not (as_html or interactive) else "HTML page")
    if interactive:
        interactive_page(subject, anomaly_map, output, label, threshold, resample, as_html)
        return
    if not as_html:
        path = render_heatmap(subject, anomaly_map, output, label=label, n_slices=slices, threshold=threshold,
                              unit=unit, resample=resample)
        ui.out.print(f"heatmap: {path}")
        return
    if unit is not None:
        raise InputError("--unit applies to one map; with --html each map's unit comes from its sidecar")
    with ui.progress() as bar:
        task = bar.add_task("heatmap", total=None, info="")

        def report(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, info=name)

        result = render_html(subject, anomaly_map, output, labels_dir=label, n_slices=slices, threshold=threshold,
                             resample=resample, progress=report)
    ui.out.print(f"html: {result.path} ({len(result.subjects)} subject(s))")
    for name, error in result.failed:
        ui.console.print(f"[red]failed[/red] {name}: {error}", highlight=False)
    if result.failed:
        raise typer.Exit(1)


def interactive_page(subject: Path, anomaly_map: Path, output: Path, label: Optional[Path], threshold: Optional[float],
                     resample: bool, folders: bool) -> None:
    """`heatmap --interactive`: one subject's files, or with --html the folders, into a NiiVue page."""
    from uadct.viewer import ViewerSubject, match_subjects, write_viewer

    if folders:
        subjects, failed = match_subjects(subject, anomaly_map, label)
    else:
        from uadct.io import strip_nifti_suffix

        subjects, failed = [ViewerSubject(strip_nifti_suffix(subject), subject, anomaly_map, label)], []
    with ui.progress() as bar:
        task = bar.add_task("viewer", total=len(subjects), info="")

        def report(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, info=name)

        result = write_viewer(subjects, output, threshold=threshold, resample=resample, failed=failed, progress=report)
    ui.out.print(f"viewer: {result.path} ({len(result.subjects)} subject(s))")
    for name, error in result.failed:
        ui.console.print(f"[red]failed[/red] {name}: {error}", highlight=False)
    if result.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``uadct`` app."""
    app.command(short_help="Draw a map over its scan: PNG montage or HTML page.")(heatmap)
