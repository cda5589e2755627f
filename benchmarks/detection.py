"""Detection quality on synthetic disks: Table 2 of the Progressive GANomaly paper, for every model.

    python benchmarks/detection.py --output bench_out/detection            # small CPU settings (~1 h on 2 cores)
    python benchmarks/detection.py --output bench_out/full --full          # paper-sized settings, for a GPU
    python benchmarks/detection.py --models cae,threshold --output ...     # a subset of the registry
    python benchmarks/detection.py --models cae,cae+forest --output ...    # "+forest": uadct train --scorer forest

Protocol (Madzia-Madzou & Kuijf 2022, section 3.2.1): a healthy volume gets a disk 35 mm
across over 50 axial slices at intensity 0.1, 0.2, ... 1.0 (one volume per intensity), and
another healthy volume gets disks 1 ... 10 mm across at intensity 1.0; the voxel AUROC of
the anomaly map is computed inside the brain only. Here the healthy volumes are demo
subjects (:mod:`uadct.demo`) put through ``uadct preprocess`` (deepbet, N4, affine to SRI24,
5th/95th percentile -> 0/1); disks go into the prepared (atlas-grid, 1 mm) volumes with
:mod:`uadct.synthetic`, at intensities mapped from the paper's scale (GM 0.25, WM 0.45) to
each subject's tissue means (``--intensity-scale paper``, default) or taken literally on
the normalised scale (``--intensity-scale normalised``; there WM is near 1).

Every model of the registry (``uadct models``; models added later are included by
themselves) is trained once on the training subjects with the settings below and scores
every condition; ``threshold`` (the normalised intensity, no learning) is the baseline.
A patch is scored from its own voxels, so a disk changes the map only within a patch
extent of it: each condition re-scores only the patches near the disk over the subject's
healthy ("control") map (:func:`score_condition`); the first condition of each model is
also scored whole and the largest difference recorded (``partial_scoring_max_abs_diff``
in the JSON; float rounding only). A model whose map is not patch-local (``normative``: the
subject's median offset and the map smoothing reach beyond a patch) fails that check and then
has every condition scored whole (``scoring`` in the JSON).

Outputs under ``--output``: ``detection.md`` and ``detection.json`` (table, settings,
per-model train/score seconds, per-subject AUROCs, disk positions), plus the work folder
(cohort, prepared subjects, checkpoints) which later runs reuse (``--fresh`` deletes it).
Seeds are fixed (``--seed``); the same settings give the same table on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from uadct.checkpoint import Checkpoint, load_checkpoint
from uadct.demo import generate_cohort
from uadct.io import write_json, write_text
from uadct.metrics import voxel_metrics
from uadct.patches import PatchSpec
from uadct.models import available_models, model_class
from uadct.inference import score_volume
from uadct.preprocess.batch import preprocess_many
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.prepared import find_prepared, load_prepared
from uadct.synthetic import (
    PAPER_DIAMETERS_MM, PAPER_INTENSITIES, PAPER_INTENSITY_DIAMETER_MM, PAPER_SIZE_INTENSITY, PAPER_SLICES,
    DiskPlacement, insert_disk, paper_to_normalised, place_disk, resize_disk, tissue_anchors,
)
from uadct.training import TrainConfig, train_model

# Table 2 of Madzia-Madzou & Kuijf 2022: GANomaly 16x16, 32x32, progressive GANomaly 16x16, 32x32
PAPER_COLUMNS = ("GANomaly 16", "GANomaly 32", "Progressive 16", "Progressive 32")
PAPER_INTENSITY_TABLE = {
    0.1: (0.61, 0.79, 0.06, 0.57), 0.2: (0.39, 0.38, 0.17, 0.79), 0.3: (0.10, 0.14, 0.12, 0.13),
    0.4: (0.07, 0.08, 0.12, 0.56), 0.5: (0.15, 0.31, 0.99, 0.88), 0.6: (0.60, 0.88, 0.62, 0.97),
    0.7: (0.94, 1.00, 0.39, 0.97), 0.8: (1.00, 1.00, 0.99, 1.00), 0.9: (1.00, 1.00, 1.00, 1.00),
    1.0: (1.00, 1.00, 1.00, 1.00),
}
PAPER_SIZE_TABLE = {
    1.0: (0.37, 0.37, 0.91, 0.21), 2.0: (0.77, 0.47, 0.87, 0.25), 3.0: (0.93, 0.65, 0.96, 0.62),
    4.0: (0.99, 0.91, 0.99, 0.74), 5.0: (1.00, 0.99, 1.00, 0.88), 6.0: (1.00, 1.00, 1.00, 0.95),
    7.0: (1.00, 1.00, 1.00, 0.99), 8.0: (1.00, 1.00, 1.00, 1.00), 9.0: (1.00, 1.00, 1.00, 1.00),
    10.0: (1.00, 1.00, 1.00, 1.00),
}

SMALL = {"healthy": 6, "test_subjects": 1, "patch_size": 16, "epochs": 8, "patience": 3, "patches_per_epoch": 4096,
         "validation_patches": 1024, "statistics_patches": 2048}
FULL = {"healthy": 40, "test_subjects": 3, "patch_size": 32, "epochs": 200, "patience": 10, "patches_per_epoch": 32768,
        "validation_patches": 4096, "statistics_patches": 8192}
LOCAL_TOLERANCE = 1e-4  # partial re-scoring must match whole-volume scoring this closely, else conditions are scored whole
GAN_PHASE_SHARE = 0.5  # models with a `gan_steps` field spend this share of the step budget on the GAN phase
SMALL_WIDTH = 16  # small settings: models with `base_channels` (the GANs) at a quarter of their width
GROWING_EPOCHS_FACTOR = 4  # growing models (a `fade_patches` field) get this many times the epochs ...
FADE_EPOCHS = 2  # ... and fade a new resolution in over this many epochs

log = logging.getLogger("detection")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("bench_out/detection"))
    parser.add_argument("--models", default="all", help="comma-separated registry names, or 'all' (default)")
    parser.add_argument("--full", action="store_true", help="paper-sized settings (more subjects, patch 32, more epochs; GPU)")
    parser.add_argument("--healthy", type=int, help=f"training subjects (small {SMALL['healthy']}, full {FULL['healthy']})")
    parser.add_argument("--test-subjects", type=int,
                        help="held-out subjects per test (intensity, size); AUROC is their mean (small 1, full 3)")
    parser.add_argument("--patch-size", type=int, help="small 16, full 32")
    parser.add_argument("--epochs", type=int, help="maximum epochs (small 8, full 200)")
    parser.add_argument("--patience", type=int, help="early-stopping patience in epochs (small 3, full 10)")
    parser.add_argument("--patches-per-epoch", type=int, help="small 4096, full 32768")
    parser.add_argument("--model-options", default="{}",
                        help='JSON {"model": {"field": value}} passed to the models\' configs')
    parser.add_argument("--intensity-scale", choices=("paper", "normalised"), default="paper")
    parser.add_argument("--only", choices=("intensity", "size"), help="run one of the two tests")
    parser.add_argument("--limit-conditions", type=int, help="score only the first N conditions of each test (timing)")
    parser.add_argument("--voxel-scale", type=float, default=1.0, help="demo voxel size factor (atlas grid stays 1 mm)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete the work folder (cohort, prep, checkpoints) first")
    options = parser.parse_args(argv)
    preset = FULL if options.full else SMALL
    for key, value in preset.items():
        if getattr(options, key, None) is None:
            setattr(options, key, value)
    return options


def select_models(spec: str) -> list[str]:
    """Registry names to run: all of them (the baseline first) or the listed ones, in their order."""
    if spec != "all":  # in the order given
        wanted = [n.strip() for n in spec.split(",") if n.strip()]
        for name in wanted:
            model, _, scorer = name.partition("+")
            model_class(model)  # an unknown name fails with the list of models
            if scorer not in ("", "forest"):
                raise SystemExit(f"{name}: the only scorer suffix is '+forest' (uadct train --scorer forest)")
        return list(dict.fromkeys(wanted))
    # the baseline first, then the paper's models, then the rest
    return sorted(available_models(), key=lambda n: (n != "threshold", "ganomaly" not in n, n))


def model_options_for(name: str, options: argparse.Namespace, extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Config overrides for one model: a GAN phase sized to the step budget, then the user's."""
    fields = {f for f in model_class(name).Config.__dataclass_fields__}
    result: dict[str, Any] = {}
    if not options.full and "base_channels" in fields:
        result["base_channels"] = SMALL_WIDTH
    if "fade_patches" in fields:
        result["fade_patches"] = FADE_EPOCHS * options.patches_per_epoch
    if "gan_steps" in fields:
        total_steps = options.epochs * max(1, options.patches_per_epoch // 128)
        result["gan_steps"] = int(GAN_PHASE_SHARE * total_steps)
    result.update(extra.get(name, {}))
    return result


def epochs_for(name: str, options: argparse.Namespace) -> int:
    """The epoch limit: growing models need room for a plateau per resolution and the fade-ins."""
    growing = "fade_patches" in model_class(name).Config.__dataclass_fields__
    return options.epochs * GROWING_EPOCHS_FACTOR if growing else options.epochs


def prepare_cohort(options: argparse.Namespace, work: Path) -> tuple[Path, list[Path]]:
    """Demo cohort and preprocessing: ``work/prep/train`` and the held-out test subjects' folders.

    Subjects ``sub-h000 ... sub-h(H-1)`` train; the next ``2 * K`` healthy subjects are held
    out (the first K for the intensity test, the next K for the size test).
    """
    n_test = 2 * options.test_subjects
    n_all = options.healthy + n_test
    cohort_dir = work / "cohort"
    healthy = sorted((cohort_dir / "healthy").glob("*.nii.gz"))
    if len(healthy) != n_all:
        shutil.rmtree(cohort_dir, ignore_errors=True)
        healthy = generate_cohort(cohort_dir, n_healthy=n_all, n_test=0, seed=options.seed,
                                  voxel_scale=options.voxel_scale).healthy
    config = PreprocessConfig()
    for group, paths in (("train", healthy[: options.healthy]), ("test", healthy[options.healthy :])):
        outcome = preprocess_many(paths, work / "prep" / group, config)
        if outcome.failed:
            raise SystemExit(f"preprocessing failed: {outcome.failed}")
    return work / "prep" / "train", find_prepared(work / "prep" / "test")


def build_conditions(test_dirs: list[Path], options: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (test, condition, subject) with its disk: intensity test on the first K subjects, size test on the rest."""
    k = options.test_subjects
    conditions: list[dict[str, Any]] = []
    tests = [t for t in ("intensity", "size") if options.only in (None, t)]
    for test in tests:
        subjects = test_dirs[:k] if test == "intensity" else test_dirs[k : 2 * k]
        values = PAPER_INTENSITIES if test == "intensity" else PAPER_DIAMETERS_MM
        if options.limit_conditions:
            values = values[: options.limit_conditions]
        for index, folder in enumerate(subjects):
            prepared = load_prepared(folder)
            mask = sitk.GetArrayFromImage(prepared.mask) > 0
            image = sitk.GetArrayFromImage(prepared.image).astype(np.float32)
            spacing = tuple(float(s) for s in prepared.image.GetSpacing()[::-1])
            anchors = tissue_anchors(image, mask, seed=options.seed)
            seed = options.seed * 1000 + (0 if test == "intensity" else 500) + index
            if test == "intensity":
                base = place_disk(mask, spacing, PAPER_INTENSITY_DIAMETER_MM, PAPER_SLICES, seed=seed)
            else:  # one position for all sizes, chosen so that the largest disk fits
                base = place_disk(mask, spacing, max(PAPER_DIAMETERS_MM), PAPER_SLICES, seed=seed)
            for value in values:
                paper_intensity = value if test == "intensity" else PAPER_SIZE_INTENSITY
                placement = base if test == "intensity" else resize_disk(base, value, spacing[1:])
                intensity = (paper_to_normalised(paper_intensity, anchors) if options.intensity_scale == "paper"
                             else paper_intensity)
                conditions.append({
                    "test": test, "value": float(value), "subject": prepared.subject, "folder": folder,
                    "placement": placement, "intensity": intensity, "paper_intensity": paper_intensity,
                    "anchors": asdict(anchors), "spacing": spacing,
                })
    return conditions


def changed_box(lesion: np.ndarray, patch_shape: tuple[int, int, int], margin: int) -> tuple[slice, slice, slice]:
    """The lesion's bounding box widened by ``margin`` patch extents minus one voxel, per axis."""
    box = []
    for axis, extent in enumerate(patch_shape):
        present = np.flatnonzero(lesion.any(axis=tuple(a for a in range(3) if a != axis)))
        reach = margin * (extent - 1)
        box.append(slice(max(0, int(present[0]) - reach), min(lesion.shape[axis], int(present[-1]) + 1 + reach)))
    return box[0], box[1], box[2]


def score_condition(
    checkpoint: Checkpoint, volume: np.ndarray, mask: np.ndarray, control: np.ndarray, lesion: np.ndarray, device: str,
) -> np.ndarray:
    """The map of ``volume`` (the control volume with ``lesion`` voxels changed): the control map, re-scored near the lesion.

    A patch is scored from its own voxels only, so only voxels within a patch extent of
    the lesion can change (box B1); those are covered by exactly the patches that touch
    the brain inside B1 widened by another patch extent (box B2; the grid of patch
    positions does not depend on the mask). So the brain mask cut to B2 gives the full
    map's values inside B1, and the control map holds the rest.
    """
    patch = checkpoint.metadata.get("patch", {})
    spec = PatchSpec(int(patch.get("size", 16)), int(patch.get("dims", 2)))
    if not lesion.any():
        return control.copy()
    changed = changed_box(lesion, spec.shape, margin=1)
    scored = changed_box(lesion, spec.shape, margin=2)
    restricted = np.zeros_like(mask)
    restricted[scored] = mask[scored]
    partial = score_volume(checkpoint, volume, restricted, device=device)
    result = control.copy()
    result[changed] = partial[changed]
    return result


def run(options: argparse.Namespace, on_model_done: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train and score every selected model; ``on_model_done`` gets the report so far after each model."""
    started = time.perf_counter()
    work = options.output / "work"
    if options.fresh:
        shutil.rmtree(work, ignore_errors=True)
    extra_options = json.loads(options.model_options)
    models = select_models(options.models)
    clock = time.perf_counter()
    train_dir, test_dirs = prepare_cohort(options, work)
    data_seconds = time.perf_counter() - clock
    log.info("cohort and preprocessing: %.0f s", data_seconds)
    conditions = build_conditions(test_dirs, options)
    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for condition in conditions:
        if condition["subject"] not in volumes:
            prepared = load_prepared(condition["folder"])
            volumes[condition["subject"]] = (sitk.GetArrayFromImage(prepared.image).astype(np.float32),
                                             (sitk.GetArrayFromImage(prepared.mask) > 0).astype(np.uint8))

    results: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for name in models:
        checkpoint_path = work / "models" / f"{name}.pt"
        model, _, scorer = name.partition("+")  # "cae+forest": the model with the forest scorer on its latent features
        config = TrainConfig(
            model=model, patch_size=options.patch_size, max_epochs=epochs_for(model, options), patience=options.patience,
            patches_per_epoch=options.patches_per_epoch, validation_patches=options.validation_patches,
            statistics_patches=options.statistics_patches, seed=options.seed, device=options.device,
            model_options=model_options_for(model, options, extra_options), scorer=scorer or "model",
        )
        clock = time.perf_counter()
        trained = _matching_checkpoint(checkpoint_path, config)
        if trained is None:
            result = train_model(train_dir, checkpoint_path, config, resume=True)
            train_seconds, epochs, best_epoch = result.seconds, len(result.history), result.best_epoch
        else:
            train_seconds, epochs, best_epoch = trained
        log.info("%s: trained in %.0f s (%d epochs, best %d)", name, train_seconds, epochs, best_epoch)
        checkpoint = load_checkpoint(checkpoint_path)
        clock = time.perf_counter()
        controls: dict[str, np.ndarray] = {}
        rows: list[dict[str, Any]] = []
        check: float | None = None
        whole_only = False
        for condition in conditions:
            image, mask = volumes[condition["subject"]]
            if condition["subject"] not in controls:
                controls[condition["subject"]] = score_volume(checkpoint, image, mask, device=options.device)
            volume, lesion = insert_disk(image, mask, condition["placement"], condition["intensity"], condition["spacing"])
            if whole_only:
                anomaly = score_volume(checkpoint, volume, mask, device=options.device)
            else:
                anomaly = score_condition(checkpoint, volume, mask, controls[condition["subject"]], lesion, options.device)
            if check is None:
                whole = score_volume(checkpoint, volume, mask, device=options.device)
                check = float(np.abs(whole - anomaly).max())
                if check > LOCAL_TOLERANCE:  # the map is not patch-local (a whole-volume model: normative's
                    whole_only, anomaly = True, whole  # subject offset and smoothing): score every condition whole
            inside = mask > 0
            metrics = voxel_metrics(anomaly[inside], lesion[inside])
            rows.append({"test": condition["test"], "value": condition["value"], "subject": condition["subject"],
                         "auroc": metrics["auroc"], "auprc": metrics["auprc"], "lesion_voxels": metrics["n_positive"]})
            log.info("%s %s %g %s: AUROC %.3f", name, condition["test"], condition["value"], condition["subject"],
                     metrics["auroc"])
        score_seconds = time.perf_counter() - clock
        log.info("%s: scored %d conditions in %.0f s", name, len(conditions), score_seconds)
        results[name] = {
            "train_seconds": round(train_seconds, 1), "epochs_run": epochs, "best_epoch": best_epoch,
            "score_seconds": round(score_seconds, 1), "partial_scoring_max_abs_diff": check,
            "scoring": "whole volume per condition" if whole_only else "partial (patches near the disk)",
            "model_options": config.model_options, "rows": rows,
        }
        report = {
            "protocol": "Madzia-Madzou & Kuijf 2022, Table 2: disk 35 mm over 50 axial slices at intensities 0.1..1.0; "
                        "disks 1..10 mm at 1.0; voxel AUROC inside the brain (mean over the test subjects)",
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
            "models_selected": models,
            "data_seconds": round(data_seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "disks": [_jsonable(c) for c in conditions],
            "models": results,
            "table": summary_table(results, conditions),
        }
        if on_model_done is not None:
            on_model_done(report)
    return report


def _jsonable(condition: dict[str, Any]) -> dict[str, Any]:
    """A condition for the JSON report (placements as dicts, paths as text, NaN as null)."""
    out: dict[str, Any] = {}
    for key, value in condition.items():
        if isinstance(value, DiskPlacement):
            value = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(value).items()}
        out[key] = str(value) if isinstance(value, Path) else value
    return out


def _matching_checkpoint(path: Path, config: TrainConfig) -> tuple[float, int, int] | None:
    """(seconds, epochs, best epoch) of an existing checkpoint trained with the same config, else None."""
    if not path.is_file():
        return None
    metadata = load_checkpoint(path).metadata
    training = metadata.get("training", {})
    # the checkpoint records the device used, not "auto"
    wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k != "device"}
    if any(training.get(k) != v for k, v in wanted.items()):
        return None
    return float(training.get("seconds", math.nan)), int(training.get("epochs_run", 0)), int(training.get("best_epoch", -1))


def summary_table(results: dict[str, Any], conditions: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{test: {value: {model: mean AUROC over subjects}}}``."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, result in results.items():
        for row in result["rows"]:
            cell = table.setdefault(row["test"], {}).setdefault(f"{row['value']:g}", {})
            cell.setdefault(name, []).append(row["auroc"])  # type: ignore[arg-type]
    for test in table.values():
        for cell in test.values():
            for name, values in cell.items():
                cell[name] = float(np.mean(values))  # type: ignore[assignment]
    return table


def markdown(report: dict[str, Any]) -> str:
    """The table in the layout of the paper's Table 2, our models beside the paper's four columns."""
    models = list(report["models"])
    lines = []
    for test, label, paper in (("intensity", "Intensity", PAPER_INTENSITY_TABLE), ("size", "Size (mm)", PAPER_SIZE_TABLE)):
        rows = report["table"].get(test)
        if not rows:
            continue
        title = ("Intensity test: disk 35 mm, 50 slices" if test == "intensity"
                 else "Size test: intensity 1.0, 50 slices")
        lines += [f"**{title}** (voxel AUROC inside the brain)", ""]
        lines.append("| " + " | ".join([label, *models, *(f"paper {c}" for c in PAPER_COLUMNS)]) + " |")
        lines.append("|" + "---|" * (1 + len(models) + len(PAPER_COLUMNS)))
        for value, cell in rows.items():
            ours = [f"{cell[m]:.2f}" if m in cell and not math.isnan(cell[m]) else "n/a" for m in models]
            theirs = [f"{v:.2f}" for v in paper[float(value)]]
            shown = f"{float(value):.1f}" if test == "intensity" else f"{float(value):g}"
            lines.append("| " + " | ".join([shown, *ours, *theirs]) + " |")
        lines.append("")
    timing = ["| model | train s | epochs (best) | score s |", "|---|---|---|---|"]
    for name, result in report["models"].items():
        timing.append(f"| {name} | {result['train_seconds']:.0f} | {result['epochs_run']} ({result['best_epoch']}) "
                      f"| {result['score_seconds']:.0f} |")
    lines += timing + ["", f"Cohort and preprocessing {report['data_seconds']:.0f} s; wall time {report['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    options = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("uadct", "deepbet"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    options.output.mkdir(parents=True, exist_ok=True)

    def write(report: dict[str, Any]) -> None:  # after every model, so a cut-short run leaves its table
        write_json(report, options.output / "detection.json")
        write_text(markdown(report), options.output / "detection.md")

    report = run(options, write)
    print(markdown(report))


if __name__ == "__main__":
    main()
