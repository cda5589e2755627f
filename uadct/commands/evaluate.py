"""`uadct evaluate`: options -> :func:`~uadct.evaluate.evaluate_folder` -> the metrics table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from uadct.commands import _console as ui
from uadct.errors import InputError

def evaluate(
    maps: Path = typer.Argument(..., help="Folder of anomaly maps (<id>.nii.gz), with their score sidecars (<id>.json) if any."),
    labels: Optional[Path] = typer.Argument(None, help="Folder of lesion masks with the same names, on the same grids (PNG masks for 2D maps); optional with --image-labels."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="MAPS-report/ beside the maps folder", help="Report folder."),
    brain_masks: Optional[Path] = typer.Option(None, help="Folder of brain masks (default: the maps' nonzero voxels)."),
    fpr: str = typer.Option("0.01,0.05", help="Voxel false-positive rates at which to report Dice and threshold (comma-separated)."),
    median_filter: int = typer.Option(0, help="3D median filter size in voxels applied to the maps before scoring (0: off)."),
    min_component_size: int = typer.Option(0, help="Remove predicted clusters smaller than this many voxels after thresholding (0: off)."),
    threshold: Optional[float] = typer.Option(None, help="Voxel threshold for the lesion level (default: validation or pooled best-Dice threshold)."),
    lesion_overlap: float = typer.Option(0.0, help="Fraction of a lesion's voxels to flag for a detection (0: one voxel)."),
    top_k: int = typer.Option(1000, help="Image score without a sidecar: mean of the top K map voxels."),
    unlabelled_normal: bool = typer.Option(False, "--unlabelled-normal", help="Maps without a label file are normal subjects (default: skipped)."),
    threshold_from: Optional[Path] = typer.Option(None, help="metrics.json of a validation run: apply its F1-optimal image threshold (and its voxel threshold)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples over subjects for confidence intervals (0: none)."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write roc.png, pr.png and image_roc.png."),
    image_level: str = typer.Option("subject", metavar="subject|slice", help="Samples of the image-level metrics: subjects or axial slices."),
    image_labels: Optional[Path] = typer.Option(None, "--image-labels", metavar="CSV|FOLDER",
                                                help="Normal/abnormal per image: a CSV/TSV (id,label) or a folder with normal/ and abnormal/ sub-folders; reports image-level AUROC/AUPRC (no lesion masks needed)."),
) -> None:
    """Voxel, lesion and image-level metrics inside the brain, per subject and pooled, with a report.

    With --image-labels (normal/abnormal per image, e.g. 2D images) the image level is measured
    from the maps' image scores alone; LABELS may then be left out.
    """
    from uadct.default_outputs import evaluate_output
    from uadct.evaluate import EvaluationOptions, evaluate_folder
    from uadct.evaluation_report import fpr_key
    from uadct.outputs import check_output_folder

    output = output or ui.announce(evaluate_output(maps))
    check_output_folder(output)
    try:
        fprs = tuple(float(item) for item in fpr.split(",") if item.strip())
    except ValueError:
        raise InputError(f"--fpr must be comma-separated numbers, got {fpr!r}") from None
    options = EvaluationOptions(
        fprs=fprs, median_filter=median_filter, min_component_size=min_component_size, threshold=threshold,
        lesion_overlap=lesion_overlap, image_top_k=top_k, unlabelled_are_normal=unlabelled_normal,
        threshold_from=threshold_from, bootstrap=bootstrap, seed=seed, plots=plots, image_level=image_level,
    )
    if labels is None and image_labels is None:
        raise InputError("give a folder of lesion masks (LABELS), --image-labels, or both")
    if image_labels is not None:
        evaluate_image_labels(maps, image_labels, output, options)
        if labels is None:
            return
    with ui.progress() as bar:
        task = bar.add_task("evaluate", total=None, info="")

        def report(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, info=name)

        result = evaluate_folder(maps, labels, output, brain_masks_dir=brain_masks, progress=report, options=options)
    columns = ["subject", "AUROC", "AUPRC", "best Dice", *(f"Dice@FPR {f:g}" for f in fprs), "lesions found", "FP clusters", "image score"]
    table = Table(ui.id_column(), *columns[1:], title="evaluation (inside the brain)")
    pooled_row = {"subject": "pooled", **result.pooled, "n_detected": result.pooled["lesion"]["n_detected"],
                  "n_lesions": result.pooled["lesion"]["n_lesions"], "n_fp_clusters": result.pooled["lesion"]["fp_clusters_per_subject"],
                  "image_score": None}
    for row in result.per_subject + [pooled_row]:
        table.add_row(str(row["subject"]), ui.fmt(row.get("auroc")), ui.fmt(row.get("auprc")), ui.fmt(row.get("best_dice")),
                      *(ui.fmt(row.get(fpr_key("dice", f))) for f in fprs), lesions_cell(row, result.pooled["lesion"]),
                      ui.fmt(row["n_fp_clusters"]) if row["subject"] == "pooled" else str(row["n_fp_clusters"]),
                      ui.fmt(row.get("image_score")), style="bold" if row["subject"] == "pooled" else None)
    ui.print_table(table)
    image = result.pooled["image_level"]
    ui.out.print(f"image level ({image['unit']}s): AUROC {ui.fmt(image['auroc'])}, F1 {ui.fmt(image['f1'])} at threshold {ui.fmt(image['threshold'])} "
                 f"({image['threshold_source']})", highlight=False)
    _finish(result)


def evaluate_image_labels(maps: Path, image_labels: Path, output: Path, options: Any) -> None:
    """`evaluate --image-labels`: image-level AUROC/AUPRC of the maps' image scores against normal/abnormal labels."""
    from uadct.image_labels import evaluate_image_labels as measure

    result = measure(maps, image_labels, output, options)
    metrics = result.metrics
    interval = metrics.get("auroc_interval")
    ui.out.print(f"image level ({len(result.per_image)} images, {metrics['n_abnormal']} abnormal): AUROC {ui.fmt(metrics['auroc'])}"
                 + (f" ({ui.fmt(interval[0])}-{ui.fmt(interval[1])})" if interval else "")
                 + f", AUPRC {ui.fmt(metrics['auprc'])}, F1 {ui.fmt(metrics.get('f1'))} at threshold {ui.fmt(metrics['threshold'])} "
                 f"({metrics['threshold_source']})", highlight=False)
    if result.missing:
        ui.console.print(f"{len(result.missing)} map(s) without an image label left out", highlight=False)
    _finish(result)


def lesions_cell(row: dict[str, Any], lesion: dict[str, Any]) -> str:
    """Lesions found, or that the threshold flags the whole brain (nothing was detected)."""
    if row.get("threshold_flags") == "everything":
        return "threshold flags everything"
    flagged_all = lesion.get("subjects_where_threshold_flags_everything") or []
    if row["subject"] == "pooled" and flagged_all:
        return f"{row['n_detected']}/{row['n_lesions']} ({len(flagged_all)} subject(s): threshold flags everything)"
    return f"{row['n_detected']}/{row['n_lesions']}"


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``uadct`` app."""
    app.command(short_help="Voxel, lesion and image-level metrics with a report.")(evaluate)


def _finish(result: Any) -> None:
    """The written files, then each failed subject; exit code 1 when any failed."""
    for kind, path in result.files.items():
        ui.out.print(f"{kind}: {path}")
    for name, error in result.failed:
        ui.console.print(f"[red]failed[/red] {name}: {error}", highlight=False)
    if result.failed:
        raise typer.Exit(1)
