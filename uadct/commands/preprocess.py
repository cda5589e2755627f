"""`uadct preprocess`: options -> :func:`~uadct.preprocess.batch.preprocess_many` -> the summary table or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Column, Table
from rich.text import Text

from uadct.commands import _console as ui
from uadct.commands._inputs import allow_image_memory, collect_subjects, select_series
from uadct.errors import InputError

def preprocess(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, folders of them, DICOM series folders, a BIDS dataset, 2D images (PNG/JPEG/TIFF/DICOM files or folders), or - for paths on stdin."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="BIDS: <dataset>/derivatives/uadct/; a folder F: F-uadct/; else uadct-prep/",
                                          help="Output folder (one sub-folder per subject; a BIDS derivative for BIDS input)."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="DICOM: the Series Instance UID to read when a folder holds several series."),
    atlas: Optional[str] = typer.Option(None, show_default="sri24; none for 2D", help="Atlas name or path to a skull-stripped template."),
    modality: str = typer.Option("mr", help="mr (deepbet, robust N4, tissue normalisation), ct (HU skull-strip, no N4, brain window), or 2D images: xray or image (PNG/JPEG/TIFF/DICOM; resized, percentile-normalised, no atlas); sets the defaults below."),
    skull_strip: Optional[str] = typer.Option(None, help="deepbet, hd-bet (HD-BET 2.0 weights needed), ct (head CT in HU) or none (input already skull-stripped). [default: from --modality]"),
    hdbet_weights: Optional[Path] = typer.Option(None, help="HD-BET weights folder. [default: $UADCT_HDBET_WEIGHTS, then ~/hd-bet_params/release_2.0.0]"),
    registration: Optional[str] = typer.Option(None, show_default="affine; none for 2D", help="affine, rigid or none (input already on the atlas grid)."),
    registration_backend: str = typer.Option("sitk", help="sitk (SimpleITK, ~1 s) or elastix (itk-elastix; ~12 s more on its first call)."),
    bias_correction: Optional[bool] = typer.Option(None, "--bias-correction/--no-bias-correction", help="N4 bias-field correction. [default: on for mr, off for ct]"),
    bias_field: Optional[str] = typer.Option(None, "--bias-field", help="robust (N4 fitted on normal tissue only, keeps large lesions) or n4 (N4 under the whole brain mask). [default: from --modality]"),
    normalization: Optional[str] = typer.Option(None, help="tissue (normal-tissue median -> 0.5, 4 robust SDs -> 1), percentile (5th -> 0, 95th -> 1; 1st/99th for 2D), zscore, ct-window, or for 2D DICOM dicom-window (the file's Window Center/Width). [default: from --modality]"),
    image_size: Optional[str] = typer.Option(None, "--image-size", metavar="N|HxW", help="2D: pixels the images are resized to, e.g. 256 or 256x320. [default: 256]"),
    resize: Optional[str] = typer.Option(None, "--resize", metavar="pad|crop|stretch", help="2D: pad (aspect kept, zero border outside the mask), crop (aspect kept, centre) or stretch. [default: pad]"),
    fov_mask: Optional[str] = typer.Option(None, "--fov-mask", metavar="image|nonzero|otsu", help="2D field of view scored: the whole image, its nonzero pixels, or the bright Otsu region. [default: nonzero for xray, image for image]"),
    resolution_mm: Optional[float] = typer.Option(None, "--resolution-mm", metavar="MM", help="Blur finer scans to this effective resolution first (a cohort of mixed resolutions). [default: none]"),
    ct_level: Optional[float] = typer.Option(None, help="ct-window level in HU. [default: 40]"),
    ct_width: Optional[float] = typer.Option(None, help="ct-window width in HU. [default: 80]"),
    sequences: Optional[str] = typer.Option(None, help="Sequences per subject, e.g. T1w,FLAIR: BIDS suffixes, or files named <subject>_<sequence>.nii.gz. [default: one scan per subject; T1w for BIDS]"),
    reference: Optional[str] = typer.Option(None, help="The sequence that is skull-stripped and registered; the others follow it. [default: the first]"),
    participant_label: Optional[list[str]] = typer.Option(None, "--participant-label", help="BIDS: only these participants (01 or sub-01), separated by spaces or commas, or the option repeated."),
    jobs: int = typer.Option(1, "-j", "--jobs", min=1, help="Subjects preprocessed in parallel worker processes."),
    force: bool = typer.Option(False, "--force", help="Redo subjects that are already complete."),
    shard: Optional[str] = typer.Option(None, help="I/N: do only shard I (0-based) of N; default from SLURM array variables."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", metavar="SIZE",
                                             help="Memory one scan may take when read, e.g. 8G (default 2G); larger scans are refused from their header."),
) -> None:
    """Skull-strip, register to the atlas, normalise and mask every scan."""
    import os

    from uadct.batch import resolve_shard, select_shard
    from uadct.default_outputs import preprocess_output
    from uadct.preprocess.bids import parse_sequences, resolve_reference
    from uadct.preprocess.intensity import CT_BRAIN_WINDOW_HU
    from uadct.outputs import check_output_folder, refuse_shared_names
    from uadct.preprocess.batch import preprocess_many
    from uadct.preprocess.config import PreprocessConfig
    from uadct.preprocess.config import parse_image_size

    select_series(series_uid)
    if max_memory:  # workers inherit it
        from uadct.memory import parse_memory

        allow_image_memory(parse_memory(max_memory))
    names = parse_sequences(sequences)
    output = output or ui.announce(preprocess_output(inputs))
    participants = [label for item in participant_label or [] for label in item.replace(",", " ").split()]
    if reference is not None and not names:
        raise InputError("--reference needs --sequences")
    subjects = select_shard(collect_subjects(inputs, names, reference, participants or None), resolve_shard(shard),
                            key=lambda s: s.subject)
    check_output_folder(output)
    refuse_shared_names(((str(s.folder), s.reference_path) for s in subjects), output)
    window = None
    if ct_level is not None or ct_width is not None:
        window = (ct_level if ct_level is not None else CT_BRAIN_WINDOW_HU[0], ct_width if ct_width is not None else CT_BRAIN_WINDOW_HU[1])
    config = PreprocessConfig.for_modality(modality, atlas=atlas, skull_strip=skull_strip, registration=registration,
                                           registration_backend=registration_backend,
                                           bias_correction=bias_correction, bias_correction_method=bias_field,
                                           normalization=normalization, ct_window=window, resolution_mm=resolution_mm,
                                           image_size=parse_image_size(image_size) if image_size is not None else None,
                                           resize=resize, fov_mask=fov_mask,
                                           sequences=tuple(names) or None,
                                           reference=resolve_reference(names, reference) if names else None)
    if config.skull_strip == "hd-bet":
        from uadct.preprocess.hdbet import HDBET_WEIGHTS_ENV, resolve_weights

        os.environ[HDBET_WEIGHTS_ENV] = str(resolve_weights(hdbet_weights))  # fails here, once; workers inherit it
    with ui.progress() as bar:
        task = bar.add_task("preprocess", total=len(subjects), info="")
        outcome = preprocess_many(subjects, output, config, force, jobs=jobs,
                                  progress=lambda path, status: bar.update(task, advance=1, info=f"{path.name}: {status}"))
    rows = [preprocess_row(record) for record in outcome.records]
    summary = {
        "output": str(output),
        "done": [str(p) for p in outcome.done],
        "skipped": [str(p) for p in outcome.skipped],
        "failed": [{"input": str(p), "error": e} for p, e in outcome.failed],
        "busy": [{"input": str(p), "message": e} for p, e in outcome.busy],
        "subjects": rows,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_preprocess_summary(rows, output)
    if outcome.failed:
        raise typer.Exit(1)


MAX_SUBJECT_ROWS = 40  # larger batches get the counts, the warned and the failed subjects only


def preprocess_row(record: Any) -> dict[str, Any]:
    """One subject's summary: status, seconds, registration Dice and NCC, warnings or the error."""
    row: dict[str, Any] = {"subject": record.subject, "input": str(record.input), "status": record.status,
                           "seconds": record.seconds, "folder": str(record.folder) if record.folder else None,
                           "mask_dice": None, "ncc": None, "warnings": [], "error": record.error}
    if record.folder is not None:
        from uadct.preprocess.prepared import PreparedFolder

        try:
            sidecar = PreparedFolder(record.folder).sidecar
        except InputError:
            return row
        quality = sidecar.get("quality", {})
        row.update(mask_dice=quality.get("mask_dice"), ncc=quality.get("ncc"), warnings=sidecar.get("warnings", []),
                   sequences=sidecar.get("sequences"))
        if record.status == "done":
            row["seconds"] = round(sum(sidecar.get("timings_s", {}).values()), 3) or record.seconds
    return row


def print_preprocess_summary(rows: list[dict[str, Any]], output: Path) -> None:
    """Counts, then one row per subject (status, seconds, registration quality, warnings or error)."""
    statuses = [row["status"] for row in rows]
    counts = Table("subjects", "count", title=f"preprocess -> {output}")
    counts.add_row("done", str(statuses.count("done")))
    counts.add_row("skipped (already complete)", str(statuses.count("skipped")))
    if "busy" in statuses:
        counts.add_row("busy (another task is writing them)", str(statuses.count("busy")), style="yellow")
    counts.add_row("with warnings", str(sum(1 for row in rows if row["warnings"])))
    counts.add_row("failed", str(statuses.count("failed")), style="red" if "failed" in statuses else None)
    ui.out.print(counts)
    shown = rows if len(rows) <= MAX_SUBJECT_ROWS else [row for row in rows if row["warnings"] or row["status"] == "failed"]
    if shown:
        detail = Table(ui.id_column(), Column("status", no_wrap=True), "seconds", "mask Dice", "NCC", title="subjects")
        detail.add_column("warnings / error", overflow="fold", ratio=1)
        for row in shown:
            style = "red" if row["status"] == "failed" else "yellow" if row["warnings"] else None
            detail.add_row(row["subject"], row["status"], f"{row['seconds']:.1f}", ui.fmt(row["mask_dice"]), ui.fmt(row["ncc"]),
                           (row["error"] or "").removeprefix(f"{row['input']}: ") or "; ".join(row["warnings"]), style=style)
        ui.print_table(detail)
    for row in rows:
        if row["status"] == "failed":
            ui.console.print(Text("failed: ", style="red") + Text(row["error"]), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``uadct`` app."""
    app.command(short_help="Skull-strip, register, normalise and mask every scan.")(preprocess)
