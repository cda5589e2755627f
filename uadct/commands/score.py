"""`uadct score` (an :class:`~uadct.inference.Inferer` and :func:`~uadct.inference.score_many`) and `uadct calibrate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Column, Table

from uadct.commands import _console as ui
from uadct.commands._inputs import allow_image_memory, collect_prepared, collect_score_inputs, parse_batch_size, select_series
from uadct.errors import InputError

def score(
    model: str = typer.Argument(..., help="Checkpoint written by `uadct train`, or a pretrained model's name (`uadct models --pretrained`), e.g. t1."),
    inputs: list[str] = typer.Argument(..., help="Raw scans, DICOM series folders, prepared subject folders, a folder of scans, or -."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="one scan: ./<id>_anomaly.nii.gz; a folder F: F-maps/; else maps/",
                                          help="Map file for one input; a folder for several."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="DICOM: the Series Instance UID to read when a folder holds several series."),
    stride: int = typer.Option(4, help="Patch stride in voxels."),
    batch_size: str = typer.Option("auto", help="Patches per forward pass, or auto: the largest batch that fits the memory budget."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", metavar="SIZE",
                                             help="Memory budget for scoring beyond the loaded program, e.g. 2G (default: 60% of free GPU memory, 25% of available RAM)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    brain_mask_out: Optional[Path] = typer.Option(None, help="Also write the brain mask on the subject's grid (file, or folder for several)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing maps."),
    shard: Optional[str] = typer.Option(None, help="I/N: score only shard I (0-based) of N; default from SLURM array variables."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary instead of the table."),
    gaussian: Optional[float] = typer.Option(None, "--gaussian", metavar="SIGMA",
                                             help="Gaussian-weighted overlap averaging; SIGMA as a fraction of the patch size (e.g. 0.125). Default: plain mean."),
    output_kind: Optional[str] = typer.Option(None, "--output-kind", metavar="voxel|scalar",
                                              help="Which model output to map (default: the model's first declared output)."),
    mood: bool = typer.Option(False, "--mood", help="MOOD challenge layout: maps in [0, 1] named like the inputs in the output folder, plus <name>.nii.gz.txt sample scores."),
    harmonize: bool = typer.Option(True, "--harmonize/--no-harmonize", help="Blur a raw scan finer than the model's training data to the coarsest training resolution first."),
    units: str = typer.Option("raw", metavar="raw|quantile|z|logp", help="Map units: the model's score, or calibrated on healthy validation subjects: quantile, z, or -log10 of the healthy exceedance probability."),
    fpr: Optional[float] = typer.Option(None, "--fpr", help="Voxel false-positive rate (on healthy validation subjects) of the lesion-mask threshold, e.g. 0.01."),
    mask_out: Optional[Path] = typer.Option(None, "--mask-out", help="Binary lesion mask (map above the --fpr threshold) on the input's grid: file, or folder for several."),
    median_filter: int = typer.Option(0, "--median-filter", metavar="N", help="Median-filter the map (N voxels per side, atlas grid) before units and threshold (0: off)."),
    erode_mask: float = typer.Option(0.0, "--erode-mask", metavar="MM", help="Drop brain voxels within MM mm of the brain border (0: off)."),
    min_component_size: int = typer.Option(0, "--min-component-size", metavar="N", help="Drop lesion-mask clusters smaller than N voxels (0: off)."),
    covariates: Optional[Path] = typer.Option(None, "--covariates", metavar="TSV",
                                              help="participants.tsv with each scored subject's covariates, for a model trained with --covariates."),
    age: Optional[float] = typer.Option(None, "--age", help="The subjects' age, for a model trained with covariates (instead of --covariates)."),
    sex: Optional[str] = typer.Option(None, "--sex", metavar="F|M", help="The subjects' sex, as written in the training table (instead of --covariates)."),
) -> None:
    """Anomaly map on the subject's own grid (stride-4 overlapping patches, overlap-averaged)."""
    from uadct.batch import resolve_shard, select_shard
    from uadct.checkpoint import load_checkpoint
    from uadct.default_outputs import score_output
    from uadct.inference import Inferer, score_many, subject_name
    from uadct.memory import parse_memory
    from uadct.postprocess import MapOptions, PostProcess
    from uadct.pretrained import resolve_checkpoint

    select_series(series_uid)
    if mask_out is not None and fpr is None:
        raise InputError("--mask-out needs --fpr (the healthy false-positive rate of the mask's threshold)")
    if units not in ("raw", "quantile", "z", "logp"):
        raise InputError(f"--units must be raw, quantile, z or logp, got {units!r}")
    map_options = MapOptions(units, fpr, PostProcess(median_filter, erode_mask, min_component_size))
    batch = parse_batch_size(batch_size)
    budget = parse_memory(max_memory) if max_memory else None
    allow_image_memory(budget)  # also the memory one scan may take when read
    if mood and str(output).endswith((".nii", ".nii.gz")):
        raise InputError(f"{output}: --mood writes a folder of maps named like the inputs; give a folder, not a NIfTI file name")
    checkpoint = load_checkpoint(resolve_checkpoint(model))
    from uadct.covariates import scoring_source

    subject_covariates = scoring_source(checkpoint.metadata, covariates, age, sex)
    collected = collect_score_inputs(inputs)
    output = output or ui.announce(score_output(inputs, collected, folder=mood))
    paths = select_shard(collected, resolve_shard(shard), key=subject_name)
    if output_kind is not None and output_kind not in ("voxel", "scalar"):
        raise InputError(f"--output-kind must be voxel or scalar, got {output_kind!r}")
    inferer = Inferer(checkpoint, stride, batch, device, gaussian, output_kind, mood=mood, max_memory=budget, harmonize=harmonize,
                      map_options=map_options, covariates=subject_covariates)
    with ui.progress() as bar:
        task = bar.add_task("score", total=len(paths), info="")

        def report(record: Any) -> None:
            done = "image_score" in record.values
            bar.update(task, advance=1, info=f"{record.subject}: " + (f"{record.values['image_score']:.4f}" if done else record.status))

        outcome = score_many(inferer, paths, output, force, brain_mask_out, mask_out, progress=report)
    table = Table(ui.id_column(), Column("map", overflow="fold"), "image score", "seconds", title=f"score with {Path(model).name}")
    rows: list[dict[str, Any]] = []
    for record in outcome.records:
        row: dict[str, Any] = {"subject": record.subject, "input": str(record.input), "map": str(record.output), "status": record.status}
        if record.status == "failed":
            row["error"] = record.error
        elif "image_score" in record.values:
            row.update(image_score=record.values["image_score"], seconds=record.seconds)
            table.add_row(record.subject, str(record.output), f"{record.values['image_score']:.4f}", f"{record.seconds:.1f}")
        else:
            table.add_row(record.subject, str(record.output), "(exists)" if record.status == "skipped" else "(busy: another task)", "-")
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        ui.print_table(table)
    for _, message in outcome.busy:
        ui.console.print(f"[yellow]skipped[/yellow] {message}")
    for _, error in outcome.failed:
        ui.console.print(f"[red]failed[/red] {error}")
    if outcome.failed:
        raise typer.Exit(1)


def calibrate(
    model: str = typer.Argument(..., help="Checkpoint (file or pretrained model name)."),
    prep: list[Path] = typer.Argument(..., help="Healthy prepared subject folders, or a folder of them."),
    output: Path = typer.Option(..., "-o", "--output", help="New checkpoint to write: MODEL with the calibration added (never MODEL itself)."),
    stride: int = typer.Option(4, help="Patch stride in voxels (as `uadct score` will use)."),
    gaussian: Optional[float] = typer.Option(None, "--gaussian", metavar="SIGMA", help="Gaussian overlap averaging (as `uadct score`)."),
    output_kind: Optional[str] = typer.Option(None, "--output-kind", metavar="voxel|scalar", help="Which model output to map (as `uadct score`)."),
    median_filter: int = typer.Option(0, "--median-filter", metavar="N", help="Median filter of the maps (as `uadct score`)."),
    erode_mask: float = typer.Option(0.0, "--erode-mask", metavar="MM", help="Brain-mask erosion in mm (as `uadct score`)."),
    exclude_labels: Optional[Path] = typer.Option(None, help="Folder of <subject>.nii.gz lesion masks whose voxels are left out."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    covariates: Optional[Path] = typer.Option(None, "--covariates", metavar="TSV",
                                              help="participants.tsv with each calibration subject's covariates, for a model trained with --covariates."),
) -> None:
    """Calibrate a model on healthy subjects for given scoring settings (for --units and --fpr)."""
    from uadct.calibrate_maps import calibrate_checkpoint
    from uadct.calibration import describe_settings
    from uadct.postprocess import PostProcess
    from uadct.outputs import check_output_file, refuse_overwriting_inputs
    from uadct.pretrained import resolve_checkpoint

    checkpoint_path = resolve_checkpoint(model)
    refuse_overwriting_inputs([output], [checkpoint_path, *prep])
    check_output_file(output, "calibrated checkpoint")
    folders = collect_prepared(prep)
    with ui.progress() as bar:
        task = bar.add_task("calibrate", total=len(folders), info="")
        path, calibration = calibrate_checkpoint(checkpoint_path, folders, output, stride, gaussian, output_kind,
                                                 PostProcess(median_filter, erode_mask), device, exclude_labels,
                                                 progress=lambda done, total: bar.update(task, completed=done),
                                                 covariates=covariates)
    ui.out.print(f"calibrated {path} on {len(calibration.subjects)} subject(s), {calibration.n_voxels} brain voxels: "
                 f"{describe_settings(calibration.settings)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``uadct`` app."""
    app.command(short_help="Anomaly map of each scan, on the scan's own grid.")(score)
    app.command(short_help="Calibrate a model on healthy subjects (for --units and --fpr).")(calibrate)
