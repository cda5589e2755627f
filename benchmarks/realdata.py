"""Detection on real scans: IXI T1 with inserted lesions and the MSLUB multiple-sclerosis patients.

    python benchmarks/realdata.py ../shared/data -o bench_out/realdata                 # small CPU settings, 3 seeds
    python benchmarks/realdata.py ../shared/data -o bench_out/realdata --models normative,threshold --seeds 0
    python benchmarks/realdata.py ../shared/data -o bench_out/realdata_full --full     # every IXI subject, larger models (GPU)

The data folder is read, never copied (see its README). Everything is prepared onto the
2 mm SRI24 brain template (:func:`uadct.atlas.coarse_brain_template`; IXI is 2 mm anyway)
with the chain a user runs (``uadct preprocess`` defaults: deepbet, lesion-robust N4, affine
registration, tissue-anchored normalisation), cached under ``OUT/work`` so reruns only score.

Tests (voxel level inside each scan's brain mask on its own native grid):

- ``ixi``: IXI T1 (2 mm, with skull, P-S-R). A fixed split (seeded, independent of
  ``--seeds``): ``test`` subjects held out, ``validation`` healthy subjects (their maps give
  each model's threshold at a 1 % voxel false-positive rate, never tuned on the test set),
  the rest train. For every seed, 1-3 lesions (:mod:`uadct.lesions`: 3-30 mm, hyper or hypo,
  irregular, soft-edged, textured) go into each test subject's RAW scan on its native grid,
  inside the brain mask its clean copy's preprocessing found; the lesioned raw files go
  through the whole chain (skull-strip ... normalisation), are scored on the atlas grid and
  mapped back to the native grid through their stored transforms. The clean copies count
  for false positives and the image-level AUROC (lesioned vs clean; image score = mean of
  the top 1000 atlas-grid voxels, as ``uadct score`` writes).
- ``mslub-flair`` / ``mslub-t2``: leave one patient out: models trained on the other two
  patients' lesion-free tissue (``--exclude-labels``; skull-stripped inputs, no skull-strip
  step); the threshold comes from those two patients' lesion-free voxels.
- ``mslub-t1``: the three T1s (1 mm: another resolution than training) scored by the
  IXI-trained models through the IXI chain, blurred first to the IXI training resolution
  (resolution harmonisation, as ``uadct score`` does with a raw scan); the threshold from the
  IXI validation subjects.

Rows: every registry model (small CPU settings by default, per model: :data:`MODEL_SETTINGS`;
``--epochs``/``--stride``/``--patches-per-epoch`` override them for every model), every ``threshold`` mode,
and the raw intensity of the native scan inside the same brain mask (``raw`` and its robust
|z| ``raw-z``: |x - median| / MAD over the subject's brain). Metrics (uadct.metrics): pooled
and per-subject AUROC, AUPRC, best Dice; Dice and lesion detection rate at the validation
1 % FPR threshold; image-level AUROC (ixi). Mean and standard deviation over ``--seeds``
(models are retrained with each seed; IXI lesions are redrawn with each seed).

Under the table: the paired per-seed difference of the default model (``uadct train``
without ``--model``) minus the best ``threshold`` mode (best by mean, per metric), mean ± std,
and the verdict "wins beyond spread" (margin of the means > the larger of the two rows'
seed std).

Outputs: ``OUT/realdata.md`` (the table and the paired differences, also printed),
``OUT/realdata_wide.md`` (one row per model: AUPRC and best Dice per test, seconds per
subject) and ``OUT/realdata.json`` (every number, per subject, the paired differences,
settings, seconds per subject for training and scoring).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from uadct.atlas import coarse_brain_template, load_atlas
from uadct.checkpoint import Checkpoint, load_checkpoint
from uadct.io import read_image, sha256_of, write_image, write_json, write_text
from uadct.lesions import describe, draw_lesions, insert_lesions
from uadct.metrics import (
    auroc, counts_at_threshold, dice_from_counts, lesion_detection, threshold_at_fpr, voxel_metrics,
    voxel_metrics_from_groups,
)
from uadct.models import available_models, model_class
from uadct.preprocess.batch import preprocess_many
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.prepared import find_prepared, is_complete, load_prepared
from uadct.preprocess.resolution import coarsest_training_mm
from uadct.inference import image_level_score, score_volume
from uadct.training import TrainConfig, train_model

log = logging.getLogger("realdata")

THRESHOLD_MODES = ("intensity", "deviation", "upper")
SMALL = {"train": 20, "validation": 4, "test": 8, "patch_size": 16, "epochs": 1, "patience": 2, "patches_per_epoch": 1024,
         "validation_patches": 256, "statistics_patches": 512, "stride": 16}
FULL = {"train": 40, "validation": 6, "test": 14, "patch_size": 32, "epochs": 100, "patience": 10, "patches_per_epoch": 32768,
        "validation_patches": 4096, "statistics_patches": 8192, "stride": 4}
# per-model training/scoring settings over the above (small CPU settings: token budgets so that every model fits
# the default run on 2 cores; the U-Net models need large patches for their context, Kascenas et al.)
MODEL_SETTINGS: dict[str, dict[str, dict[str, int]]] = {
    "small": {
        "dae-unet": {"patch_size": 64, "stride": 64, "epochs": 1, "patches_per_epoch": 32, "validation_patches": 16,
                     "statistics_patches": 16, "batch_size": 8},
        "synthetic-anomaly": {"patch_size": 64, "stride": 64, "epochs": 1, "patches_per_epoch": 32, "validation_patches": 16,
                              "statistics_patches": 16, "batch_size": 8},
    },
    "full": {
        "dae-unet": {"patch_size": 64, "stride": 32, "batch_size": 32},
        "synthetic-anomaly": {"patch_size": 64, "stride": 32, "batch_size": 32},
    },
}
SETTING_KEYS = ("patch_size", "stride", "epochs", "patience", "patches_per_epoch", "validation_patches", "statistics_patches",
                "batch_size")
SMALL_WIDTH = 16  # small settings: models with `base_channels` (the GANs) at a quarter of their width
SPLIT_SEED = 20261129  # the IXI train/validation/test split (fixed whatever --seeds)
FPR = 0.01
MSLUB_PATIENTS = ("patient07", "patient19", "patient26")
DEFAULT_MODEL = TrainConfig().model  # what `uadct train` trains without --model
METRICS = ("auroc", "auprc", "best_dice", "dice_at_val_fpr", "detection_rate", "image_auroc")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the shared data folder (ixi-t1-2mm/, mslub/)")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_out/realdata"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--full", action="store_true", help="more training subjects, patch 32, long training (GPU)")
    parser.add_argument("--models", default="all", help="registry names (comma-separated), 'all', or 'none' (only --variants)")
    parser.add_argument("--tests", default="ixi,mslub-flair,mslub-t2,mslub-t1")
    parser.add_argument("--model-options", default="{}", help='JSON {"model": {"field": value}} for the models\' configs')
    parser.add_argument("--variants", default="{}",
                        help='JSON {"row name": ["model", {"field": value}]}: extra rows (e.g. normative settings)')
    parser.add_argument("--train", type=int, help="IXI training subjects (small 20, full 40)")
    parser.add_argument("--validation", type=int, help="IXI healthy validation subjects (4, full 6)")
    parser.add_argument("--test", type=int, help="IXI test subjects, lesioned and clean (small 8, full 14)")
    parser.add_argument("--epochs", type=int, help="maximum epochs of every trained model (default: per model, small 2, full 100)")
    parser.add_argument("--stride", type=int, help="scoring stride of every patch model (default: per model, small 16, full 4)")
    parser.add_argument("--patches-per-epoch", type=int, help="training patches per epoch of every model (default: per model)")
    parser.add_argument("--jobs", type=int, default=2, help="preprocessing worker processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fresh-table", action="store_true", help="forget the results of earlier runs into --output")
    options = parser.parse_args(argv)
    options.explicit = sorted(k for k in SETTING_KEYS if getattr(options, k, None) is not None)  # override every model's
    for key, value in (FULL if options.full else SMALL).items():
        if getattr(options, key, None) is None:
            setattr(options, key, value)
    options.seeds = [int(s) for s in str(options.seeds).split(",") if s.strip()]
    options.tests = [t.strip() for t in options.tests.split(",") if t.strip()]
    return options


# ----------------------------------------------------------------------------- rows
def model_rows(spec: str, extra_options: dict[str, dict[str, Any]], variants: dict[str, list[Any]],
               full: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """Row name -> (registry model, config overrides): the default model, every threshold mode, the other models, variants."""
    names = sorted(available_models()) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip() and n.strip() != "none"]
    names.sort(key=lambda n: (n != DEFAULT_MODEL, n != "threshold"))  # the default and the baseline first (stable)
    rows: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in names:
        fields = set(model_class(name).Config.__dataclass_fields__)
        if name == "threshold":
            for mode in THRESHOLD_MODES:
                rows[f"threshold:{mode}"] = ("threshold", {"mode": mode})
            continue
        overrides: dict[str, Any] = {}
        if not full and "base_channels" in fields:
            overrides["base_channels"] = SMALL_WIDTH
        if "gan_steps" in fields:
            overrides["gan_steps"] = 2 * max(1, (FULL if full else SMALL)["patches_per_epoch"] // 128)
        if "fade_patches" in fields:
            overrides["fade_patches"] = (FULL if full else SMALL)["patches_per_epoch"]
        overrides.update(extra_options.get(name, {}))
        rows[name] = (name, overrides)
    for row, (name, overrides) in variants.items():
        model_class(name)
        rows[row] = (name, dict(overrides))
    return rows


def model_settings(model: str, options: argparse.Namespace) -> dict[str, int]:
    """Training and scoring settings of one registry model: the run's defaults, the model's own
    (:data:`MODEL_SETTINGS`), then whatever the command line set explicitly."""
    settings = {k: getattr(options, k) for k in SETTING_KEYS if getattr(options, k, None) is not None}
    settings.setdefault("batch_size", 128)
    settings.update(MODEL_SETTINGS["full" if options.full else "small"].get(model, {}))
    settings.update({k: getattr(options, k) for k in options.explicit})
    return settings


# ----------------------------------------------------------------------------- preparation
def template(work: Path) -> Path:
    path = (work / "atlas_sri24_2mm.nii.gz").resolve()  # the path is part of the recorded preprocessing config
    if not path.is_file():
        write_image(coarse_brain_template(load_atlas("sri24"), 2.0), path)
    return path


def prepare(paths: list[Path], out: Path, config: PreprocessConfig, jobs: int) -> list[Path]:
    """Preprocess (cached: complete subjects made the same way are skipped); the prepared folders."""
    names = {p.name.split(".nii")[0] for p in paths}
    if all(is_complete(out / p.name.split(".nii")[0], config, sha256_of(p)) for p in paths):
        return [p for p in find_prepared(out) if p.name in names]  # cached: no worker processes to start
    for _ in range(360):  # subjects another run is writing (busy) are waited for
        outcome = preprocess_many(paths, out, config, jobs=jobs)
        if outcome.failed:
            log.warning("preprocessing failed for %s", outcome.failed)
        done = [p for p in find_prepared(out) if p.name in names]
        if len(done) + len(outcome.failed) >= len(names):
            return done
        time.sleep(10)
    return done


def link_inputs(sources: dict[str, Path], folder: Path) -> list[Path]:
    """Symbolic links ``folder/<id>.nii.gz`` -> the data files (the data are never copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for name, source in sorted(sources.items()):
        link = folder / f"{name}.nii.gz"
        if not link.is_symlink():
            link.symlink_to(source.resolve())
        links.append(link)
    return links


def native_brain(prepared_dir: Path) -> np.ndarray:
    """The prepared brain mask carried back onto the scan's own grid (as ``uadct score --brain-mask-out``)."""
    cache = prepared_dir / "cache" / "native_brain.npy"
    if cache.is_file():
        return np.load(cache)
    prepared = load_prepared(prepared_dir)
    native = sitk.Resample(prepared.mask, prepared.native_reference, prepared.atlas_to_subject.GetInverse(),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(native) > 0
    cache.parent.mkdir(exist_ok=True)
    np.save(cache, array)
    return array


def ixi_split(data: Path, options: argparse.Namespace) -> dict[str, list[Path]]:
    scans = sorted((data / "ixi-t1-2mm").glob("*.nii.gz"))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(scans))
    test = sorted(scans[i] for i in order[: options.test])
    validation = sorted(scans[i] for i in order[options.test : options.test + options.validation])
    train = sorted(scans[i] for i in order[options.test + options.validation :])[: options.train]
    return {"train": train, "validation": validation, "test": test}


def make_lesioned(clean_prepared: list[Path], seed: int, folder: Path) -> tuple[list[Path], Path]:
    """Lesioned copies of the test subjects' raw scans (native grid) and their labels, for one seed."""
    raw_dir, label_dir = folder / "raw", folder / "labels"
    raw_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for index, prepared_dir in enumerate(clean_prepared):
        name = prepared_dir.name
        out, label_path = raw_dir / f"{name}-les.nii.gz", label_dir / f"{name}-les.nii.gz"
        if not (out.is_file() and label_path.is_file()):
            source = Path(json.loads((prepared_dir / "preprocess.json").read_text(encoding="utf-8"))["input"]["path"])
            image = read_image(source)
            brain = native_brain(prepared_dir)
            spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
            lesions = draw_lesions(brain, spacing, np.random.default_rng([seed, index]))
            array, label = insert_lesions(sitk.GetArrayFromImage(image), brain, spacing, lesions)
            lesioned = sitk.GetImageFromArray(array)
            lesioned.CopyInformation(image)
            labelled = sitk.GetImageFromArray(label)
            labelled.CopyInformation(image)
            write_json({"source": str(source), "seed": [seed, index], "lesions": describe(lesions)},
                       label_dir / f"{name}-les.json")
            write_image(labelled, label_path)
            write_image(lesioned, out)
        made.append(out)
    return made, label_dir


# ----------------------------------------------------------------------------- maps
class Subject:
    """One scored subject: its prepared folder, native brain mask, label (native) and raw scan."""

    def __init__(self, prepared_dir: Path, label_path: Path | None = None, exclude: bool = False) -> None:
        self.dir = prepared_dir
        self.name = prepared_dir.name
        self.brain = native_brain(prepared_dir)
        self.label = None
        if label_path is not None and label_path.is_file():
            self.label = (sitk.GetArrayFromImage(read_image(label_path)) > 0) & self.brain
        self.exclude = exclude  # lesion voxels left out (healthy validation tissue of patients)

    def negatives_region(self) -> np.ndarray:
        return self.brain & ~self.label if self.label is not None else self.brain


def native_map(checkpoint: Checkpoint, prepared_dir: Path, stride: int, device: str) -> tuple[np.ndarray, float]:
    """Score a prepared subject on the atlas grid and carry the map onto its native grid; (map, image score)."""
    prepared = load_prepared(prepared_dir)
    mask = sitk.GetArrayFromImage(prepared.mask)
    atlas_map = score_volume(checkpoint, sitk.GetArrayFromImage(prepared.image), mask, stride, device=device)
    image = sitk.GetImageFromArray(atlas_map.astype(np.float32))
    image.CopyInformation(prepared.image)
    native = sitk.Resample(image, prepared.native_reference, prepared.atlas_to_subject.GetInverse(), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    return sitk.GetArrayFromImage(native), image_level_score(atlas_map, mask)


def raw_maps(subject: Subject) -> dict[str, tuple[np.ndarray, float]]:
    """The raw native intensity and its robust |z| inside the brain (image score: top 1000 voxels)."""
    source = Path(json.loads((subject.dir / "preprocess.json").read_text(encoding="utf-8"))["input"]["path"])
    array = sitk.GetArrayFromImage(read_image(source)).astype(np.float32)
    values = array[subject.brain]
    centre = float(np.median(values))
    mad = max(float(np.median(np.abs(values - centre))), 1e-6)
    z = np.abs(array - centre) / mad
    return {"raw": (array, image_level_score(array, subject.brain)), "raw-z": (z, image_level_score(z, subject.brain))}


# ----------------------------------------------------------------------------- metrics
def measure(test: list[tuple[Subject, np.ndarray, float]], validation: list[tuple[Subject, np.ndarray, float]],
            clean: list[tuple[Subject, np.ndarray, float]]) -> dict[str, Any]:
    """Pooled and per-subject metrics of a test set; threshold at 1 % FPR of the validation voxels."""
    val_negatives = np.sort(np.concatenate([m[s.negatives_region()] for s, m, _ in validation]).astype(np.float32))
    threshold = threshold_at_fpr(np.zeros(0, np.float32), val_negatives, FPR)
    per_subject, positives, negatives = [], [], []
    tp = fp = n_positive = n_lesions = n_detected = 0
    for subject, anomaly, _ in test + clean:
        inside = anomaly[subject.brain]
        truth = subject.label[subject.brain] if subject.label is not None else np.zeros(inside.shape, bool)
        pos, neg = np.sort(inside[truth]), np.sort(inside[~truth])
        positives.append(pos)
        negatives.append(neg)
        t, f = counts_at_threshold(pos, neg, threshold)
        tp, fp, n_positive = tp + t, fp + f, n_positive + pos.size
        row: dict[str, Any] = {"subject": subject.name, "lesion_voxels": int(pos.size)}
        if pos.size:
            row.update({k: v for k, v in voxel_metrics(inside, truth).items() if k in ("auroc", "auprc", "best_dice")})
            row["dice_at_val_fpr"] = dice_from_counts(t, f, int(pos.size))
            found = lesion_detection((anomaly >= threshold) & subject.brain, subject.label)
            n_lesions, n_detected = n_lesions + found["n_lesions"], n_detected + found["n_detected"]
            row["detection_rate"] = found["n_detected"] / max(1, found["n_lesions"])
        per_subject.append(row)
    pooled = voxel_metrics_from_groups(np.sort(np.concatenate(positives)), np.sort(np.concatenate(negatives)))
    result = {k: float(pooled[k]) for k in ("auroc", "auprc", "best_dice")}
    result["dice_at_val_fpr"] = dice_from_counts(tp, fp, n_positive)
    result["val_threshold"] = float(threshold)
    result["detection_rate"] = n_detected / n_lesions if n_lesions else math.nan
    result["fp_voxel_rate_clean"] = (float(np.mean(np.concatenate([m[s.brain] >= threshold for s, m, _ in clean])))
                                     if clean else math.nan)
    if clean:
        scores = np.array([score for _, _, score in test + clean])
        abnormal = np.array([True] * len(test) + [False] * len(clean))
        result["image_auroc"] = float(auroc(scores, abnormal))
    else:
        result["image_auroc"] = math.nan
    result["per_subject"] = per_subject
    return result


# ----------------------------------------------------------------------------- training
def train(row: str, model: str, overrides: dict[str, Any], prep: Path, out: Path, seed: int, options: argparse.Namespace,
          exclude_labels: Path | None = None) -> tuple[Checkpoint, float]:
    """Train (or reuse) one checkpoint; (checkpoint, seconds)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    record = out.with_suffix(".seconds.json")
    if out.is_file() and record.is_file():
        return load_checkpoint(out), float(json.loads(record.read_text(encoding="utf-8"))["seconds"])
    fields = set(model_class(model).Config.__dataclass_fields__)
    settings = model_settings(model, options)
    config = TrainConfig(
        model=model, patch_size=settings["patch_size"], max_epochs=settings["epochs"], patience=settings["patience"],
        patches_per_epoch=settings["patches_per_epoch"], validation_patches=settings["validation_patches"],
        statistics_patches=settings["statistics_patches"], batch_size=settings["batch_size"], seed=seed,
        device=options.device, workers=0, exclude_labels=str(exclude_labels) if exclude_labels else None,
        model_options={k: v for k, v in overrides.items() if k in fields},
        calibration_subjects=0,  # the benchmark thresholds raw maps on its own validation subjects
    )
    started = time.perf_counter()
    train_model(prep, out, config, resume=False)
    seconds = time.perf_counter() - started
    write_json({"seconds": seconds, "row": row}, record)
    return load_checkpoint(out), seconds


def listed_dir(folder: Path, prepared: list[Path]) -> Path:
    """A folder of links to exactly ``prepared`` (training sees these subjects, whatever else an
    earlier run with other ``--train`` counts prepared beside them)."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in prepared}
    for stale in folder.iterdir():
        if stale.is_symlink() and stale.name not in wanted:
            stale.unlink()
    for p in prepared:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p.resolve(), target_is_directory=True)
    return folder


def fold_dir(work: Path, sequence: str, held_out: str, prepared: list[Path]) -> Path:
    """A folder of links to the prepared patients other than ``held_out`` (one leave-one-out fold)."""
    folder = work / "folds" / sequence / held_out
    folder.mkdir(parents=True, exist_ok=True)
    for p in prepared:
        link = folder / p.name
        if p.name != held_out and not link.exists():
            link.symlink_to(p.resolve())
    return folder


# ----------------------------------------------------------------------------- table
def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarise(results: dict[str, dict[str, dict[str, Any]]], seeds: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """test -> row -> metric -> {"mean", "std"} over seeds."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for test, rows in results.items():
        summary[test] = {}
        for row, by_seed in rows.items():
            metrics = {}
            for metric in METRICS:
                values = np.array([by_seed[str(s)][metric] for s in seeds if str(s) in by_seed], dtype=np.float64)
                if values.size and np.isfinite(values).any():
                    metrics[metric] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values)),
                                       "seeds": int(values.size)}
            summary[test][row] = metrics
    return summary


def test_order(test: str) -> int:
    """Tables list the tests in the order of ``--tests``' default."""
    known = ("ixi", "mslub-flair", "mslub-t2", "mslub-t1")
    return known.index(test) if test in known else len(known)


def paired_differences(results: dict[str, dict[str, dict[str, Any]]], summary: dict[str, dict[str, dict[str, float]]],
                       seeds: list[int], default: str) -> dict[str, dict[str, dict[str, Any]]]:
    """test -> metric -> the default model minus the best ``threshold`` mode (best by mean, per metric).

    Per seed (paired: same lesions, same split), their mean and std, and the verdict: the
    default wins by more than the seed spread when the margin of the means exceeds the
    larger of the two rows' seed standard deviations.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for test, rows in summary.items():
        modes = [r for r in rows if r.startswith("threshold:")]
        if default not in rows or not modes:
            continue
        out[test] = {}
        for metric in METRICS:
            candidates = [r for r in modes if metric in rows[r]]
            if metric not in rows[default] or not candidates:
                continue
            best = max(candidates, key=lambda r: rows[r][metric]["mean"])
            ours, theirs = results[test][default], results[test][best]
            common = [str(s) for s in seeds if str(s) in ours and str(s) in theirs]
            differences = [float(ours[s][metric]) - float(theirs[s][metric]) for s in common]
            differences = [d for d in differences if math.isfinite(d)]
            if not differences:
                continue
            a, b = rows[default][metric], rows[best][metric]
            margin, spread = a["mean"] - b["mean"], max(a["std"], b["std"])
            out[test][metric] = {
                "best_threshold": best, "per_seed": dict(zip(common, differences)),
                "mean": float(np.mean(differences)), "std": float(np.std(differences)), "margin": margin, "spread": spread,
                "wins_beyond_spread": bool(margin > spread and len(differences) > 1),  # one seed has no spread "wins_every_seed": bool(all(d > 0 for d in differences)),
            }
    return out


def paired_markdown(paired: dict[str, dict[str, dict[str, Any]]], default: str) -> str:
    """The paired differences and verdicts as a markdown table (AUPRC and best Dice first)."""
    lines = ["", f"Paired per-seed difference, default model `{default}` minus the best `threshold` mode (by mean, per "
             "metric); verdict: margin of the means > the larger of the two rows' seed std.", "",
             "| test | metric | best threshold mode | difference (mean ± std over seeds) | per seed | margin | spread | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    order = ("auprc", "best_dice", *(m for m in METRICS if m not in ("auprc", "best_dice")))
    for test in sorted(paired, key=test_order):
        metrics = paired[test]
        for metric in order:
            if metric not in metrics:
                continue
            d = metrics[metric]
            verdict = "wins beyond spread" if d["wins_beyond_spread"] else ("loses" if d["margin"] <= 0 else
                                                                             "wins (one seed)" if len(d["per_seed"]) < 2 else "wins, within spread")
            per_seed = ", ".join(f"{v:+.3f}" for v in d["per_seed"].values())
            lines.append(f"| {test} | {metric} | {d['best_threshold']} | {d['mean']:+.3f} ± {d['std']:.3f} | {per_seed} | "
                         f"{d['margin']:+.3f} | {d['spread']:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def wide_markdown(summary: dict[str, dict[str, dict[str, float]]], timing: dict[str, dict[str, dict[str, float]]],
                  default: str) -> str:
    """One compact table: a row per model, pooled AUPRC and best Dice (mean ± std) per test, seconds per subject.

    Training seconds per training subject and scoring seconds per scored subject, averaged over
    the tests that trained or scored the row.
    """
    tests = sorted(summary, key=test_order)
    rows = sorted({r for t in tests for r in summary[t]},
                  key=lambda r: (r != default, not r.startswith("threshold:"), r.startswith("raw"), r))
    head = " | ".join(f"{t} AUPRC | {t} best Dice" for t in tests)
    lines = [f"| model | {head} | train s/subject | score s/subject |", "|---" * (2 * len(tests) + 3) + "|"]
    for row in rows:
        cells = []
        for test in tests:
            for metric in ("auprc", "best_dice"):
                value = summary[test].get(row, {}).get(metric)
                cells.append("-" if value is None else f"{value['mean']:.3f} ± {value['std']:.3f}")
        seconds = []
        for kind in ("train", "score"):
            values = [timing[t][row][f"{kind}_per_subject"] for t in tests
                      if timing.get(t, {}).get(row, {}).get(f"{kind}_per_subject") is not None]
            seconds.append(f"{np.mean(values):.2f}" if values else "-")
        name = f"**{row}** (default)" if row == default else row
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds[0]} | {seconds[1]} |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict[str, dict[str, dict[str, float]]], timing: dict[str, dict[str, float]], seeds: list[int]) -> str:
    heads = ("AUROC", "AUPRC", "best Dice", "Dice @ val 1% FPR", "detection rate", "image AUROC")
    lines = [f"Pooled voxel metrics inside the brain, native grid; mean ± std over seeds {','.join(map(str, seeds))}.", "",
             "| test | model | " + " | ".join(heads) + " | train s/subject | score s/subject | seeds |",
             "|" + "---|" * (len(heads) + 5)]
    for test in sorted(summary, key=test_order):
        rows = summary[test]
        order = sorted(rows, key=lambda r: -rows[r].get("auprc", {}).get("mean", -1))
        for row in order:
            cells = []
            for metric in METRICS:
                value = rows[row].get(metric)
                cells.append("-" if value is None else f"{value['mean']:.3f} ± {value['std']:.3f}")
            n = max((v.get("seeds", 0) for v in rows[row].values()), default=0)
            t = timing.get(test, {}).get(row, {})
            train_s = f"{t['train_per_subject']:.2f}" if t.get("train_per_subject") is not None else "-"
            score_s = f"{t['score_per_subject']:.2f}" if t.get("score_per_subject") is not None else "-"
            lines.append(f"| {test} | {row} | " + " | ".join(cells) + f" | {train_s} | {score_s} | {n} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("uadct.training", "uadct.memory", "uadct.inference", "uadct.preprocess"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = options.output
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    rows = model_rows(options.models, json.loads(options.model_options), json.loads(options.variants), options.full)
    atlas_path = template(work)
    ixi_config = PreprocessConfig(atlas=str(atlas_path))
    stripped_config = PreprocessConfig(atlas=str(atlas_path), skull_strip="none")
    started = time.perf_counter()
    json_path, md_path = out / "realdata.json", out / "realdata.md"
    # earlier runs into the same folder are kept (other models, tests or seeds); a rerun replaces its own entries
    previous = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() and not options.fresh_table else {}
    results: dict[str, dict[str, dict[str, Any]]] = previous.get("results", {})
    timing: dict[str, dict[str, dict[str, dict[str, float | None]]]] = previous.get("timing_by_seed", {})
    for test in options.tests:
        results.setdefault(test, {})
        timing.setdefault(test, {})

    def note(test: str, row: str, seed: int, metrics: dict[str, Any], train_s: float | None, n_train: int,
             score_s: float | None, n_scored: int) -> None:
        results[test].setdefault(row, {})[str(seed)] = metrics
        timing[test].setdefault(row, {})[str(seed)] = {
            "train": train_s / max(1, n_train) if train_s is not None else None,
            "score": score_s / max(1, n_scored) if score_s is not None else None,
        }
        log.info("%s %s seed %d: AUROC %.3f AUPRC %.3f best Dice %.3f Dice@val %.3f", test, row, seed, metrics["auroc"],
                 metrics["auprc"], metrics["best_dice"], metrics["dice_at_val_fpr"])

    def flush() -> str:
        seeds = sorted({int(seed) for rows_ in results.values() for by_seed in rows_.values() for seed in by_seed})
        summary = summarise(results, seeds)
        times = {t: {r: {f"{kind}_per_subject": _mean([v[kind] for v in by_seed.values()]) for kind in ("train", "score")}
                     for r, by_seed in rows_.items()} for t, rows_ in timing.items()}
        paired = paired_differences(results, summary, seeds, DEFAULT_MODEL)
        table = markdown(summary, times, seeds) + paired_markdown(paired, DEFAULT_MODEL)
        write_text(table, md_path)
        write_text(wide_markdown(summary, times, DEFAULT_MODEL), out / "realdata_wide.md")
        write_json({"summary": summary, "paired_vs_best_threshold": paired, "default_model": DEFAULT_MODEL,
                    "timing_s": times, "timing_by_seed": timing, "results": results,
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
                    "rows": {r: list(v) for r, v in rows.items()}, "platform": platform.platform(),
                    "cpus": os.cpu_count(), "seconds": time.perf_counter() - started}, json_path)
        return table

    need_ixi = any(t in options.tests for t in ("ixi", "mslub-t1"))
    if need_ixi:
        split = ixi_split(options.data, options)
        prep = work / "prep"
        train_dirs = prepare(split["train"], prep / "ixi-train", ixi_config, options.jobs)
        val_dirs = prepare(split["validation"], prep / "ixi-validation", ixi_config, options.jobs)
        clean_dirs = prepare(split["test"], prep / "ixi-clean", ixi_config, options.jobs)
        log.info("IXI prepared: %d train, %d validation, %d test (%.0f s)", len(train_dirs), len(val_dirs), len(clean_dirs),
                 time.perf_counter() - started)
        train_set = listed_dir(work / "train-sets" / f"ixi-train{len(train_dirs)}", train_dirs)
        validation = [Subject(d) for d in val_dirs]
        clean = [Subject(d) for d in clean_dirs]
        coarsest = coarsest_training_mm(json.loads((d / "preprocess.json").read_text(encoding="utf-8")) for d in train_dirs)
        t1_config = dataclasses.replace(ixi_config, resolution_mm=coarsest)
    mslub = options.data / "mslub"
    mslub_prepared: dict[str, list[Path]] = {}
    labels = None
    if any(t.startswith("mslub") for t in options.tests):
        labels_dir = work / "inputs" / "mslub-labels"
        link_inputs({p: mslub / p / "lesion.nii.gz" for p in MSLUB_PATIENTS}, labels_dir)
        labels = labels_dir
        for sequence in ("FLAIR", "T2", "T1"):
            if f"mslub-{sequence.lower()}" not in options.tests:
                continue
            links = link_inputs({p: mslub / p / f"{sequence}.nii.gz" for p in MSLUB_PATIENTS},
                                work / "inputs" / f"mslub-{sequence}")
            # T1 goes through the IXI models' chain, blurred to their training resolution first (as `uadct score`
            # does with a raw scan finer than the training data: resolution harmonisation)
            config = t1_config if sequence == "T1" else stripped_config
            mslub_prepared[sequence] = prepare(links, work / "prep" / f"mslub-{sequence}", config, options.jobs)

    # the default model and the threshold modes (and variants) for every seed first, then the other models
    first = {r: v for r, v in rows.items() if v[0] in (DEFAULT_MODEL, "threshold") or r not in available_models()}
    phases = [first, {r: v for r, v in rows.items() if r not in first}]
    for phase, phase_rows in enumerate(phases):
        for seed in options.seeds:
            if need_ixi:
                lesioned_raw, label_dir = make_lesioned(clean_dirs, seed, work / "lesioned" / f"seed{seed}")
                lesioned_dirs = prepare(lesioned_raw, work / "prep" / f"ixi-lesioned-seed{seed}", ixi_config, options.jobs)
                lesioned = [Subject(d, label_dir / f"{d.name}.nii.gz") for d in lesioned_dirs]
                t1 = [Subject(d, labels / f"{d.name}.nii.gz") for d in mslub_prepared.get("T1", [])] if labels else []
                # raw intensity rows
                for test, subjects in (("ixi", (lesioned, clean)), ("mslub-t1", (t1, []))):
                    if test not in options.tests or phase:
                        continue
                    maps = {s.name: raw_maps(s) for s in [*subjects[0], *subjects[1], *validation]}
                    for row in ("raw", "raw-z"):
                        def trio(group: list[Subject]) -> list[tuple[Subject, np.ndarray, float]]:
                            return [(s, *maps[s.name][row]) for s in group]
                        note(test, row, seed, measure(trio(subjects[0]), trio(validation), trio(subjects[1])), None, 0, None, 0)
                for row, (model, overrides) in phase_rows.items():
                    stride = model_settings(model, options)["stride"]
                    checkpoint, train_s = train(row, model, overrides, train_set, work / "models" / f"seed{seed}" /
                                                f"ixi-train{len(train_dirs)}" / f"{row.replace(':', '-')}.pt", seed, options)
                    clock = time.perf_counter()
                    scored = {s.name: native_map(checkpoint, s.dir, stride, options.device)
                              for s in [*lesioned, *clean, *validation]}
                    score_s = time.perf_counter() - clock

                    def trio(group: list[Subject]) -> list[tuple[Subject, np.ndarray, float]]:
                        return [(s, *scored[s.name]) for s in group]
                    if "ixi" in options.tests:
                        note("ixi", row, seed, measure(trio(lesioned), trio(validation), trio(clean)), train_s, len(train_dirs),
                             score_s, len(scored))
                    if t1:
                        clock = time.perf_counter()
                        scored.update({s.name: native_map(checkpoint, s.dir, stride, options.device) for s in t1})
                        note("mslub-t1", row, seed, measure(trio(t1), trio(validation), []), train_s, len(train_dirs),
                             time.perf_counter() - clock, len(t1))
                    print(flush(), file=sys.stderr)
            for sequence in ("FLAIR", "T2"):
                test = f"mslub-{sequence.lower()}"
                if test not in options.tests:
                    continue
                prepared = mslub_prepared[sequence]
                subjects = {d.name: Subject(d, labels / f"{d.name}.nii.gz") for d in prepared}
                raw = {n: raw_maps(s) for n, s in subjects.items()} if not phase else {}
                for row_name in ("raw", "raw-z") if not phase else ():
                    trios = {n: (subjects[n], *raw[n][row_name]) for n in subjects}
                    note(test, row_name, seed, measure_folds(trios, subjects), None, 0, None, 0)
                for row, (model, overrides) in phase_rows.items():
                    fold_trios: dict[str, dict[str, tuple[Subject, np.ndarray, float]]] = {}
                    stride = model_settings(model, options)["stride"]
                    train_total = score_total = 0.0
                    for held_out in subjects:
                        fold = fold_dir(work, sequence, held_out, prepared)
                        fold_overrides = dict(overrides)
                        if "fit_validation" in model_class(model).Config.__dataclass_fields__:
                            fold_overrides.setdefault("fit_validation", True)  # two patients: fit on both
                        checkpoint, train_s = train(row, model, fold_overrides, fold, work / "models" / f"seed{seed}" / test /
                                                    held_out / f"{row.replace(':', '-')}.pt", seed, options, labels)
                        train_total += train_s
                        clock = time.perf_counter()
                        fold_trios[held_out] = {n: (s, *native_map(checkpoint, s.dir, stride, options.device))
                                                for n, s in subjects.items()}
                        score_total += time.perf_counter() - clock
                    metrics = measure_folds(None, subjects, fold_trios)
                    note(test, row, seed, metrics, train_total, 2 * len(subjects), score_total, len(subjects) ** 2)
                    print(flush(), file=sys.stderr)
    table = flush()
    print(table)
    log.info("done in %.0f s; %s, %s", time.perf_counter() - started, md_path, json_path)
    return 0


def measure_folds(trios: dict[str, tuple[Subject, np.ndarray, float]] | None, subjects: dict[str, Subject],
                  fold_trios: dict[str, dict[str, tuple[Subject, np.ndarray, float]]] | None = None) -> dict[str, Any]:
    """Leave-one-out: each held-out patient's map, thresholded at 1 % FPR of the fold's training
    patients' lesion-free voxels; the test maps of all folds pooled. ``trios`` (no training):
    one map per patient serves every fold."""
    test, thresholds = [], {}
    for held_out in subjects:
        maps = fold_trios[held_out] if fold_trios is not None else trios
        assert maps is not None
        others = [maps[n] for n in subjects if n != held_out]
        one = measure([maps[held_out]], others, [])
        thresholds[held_out] = one["val_threshold"]
        test.append((maps[held_out], one))
    # pool the held-out patients' voxels; Dice and detection at each fold's own threshold
    pooled = voxel_metrics_from_groups(
        np.sort(np.concatenate([m[s.brain & s.label] for (s, m, _), _ in test])),
        np.sort(np.concatenate([m[s.brain & ~s.label] for (s, m, _), _ in test])),
    )
    tp = fp = n_pos = 0
    n_lesions = n_detected = 0
    for (s, m, _), one in test:
        pos, neg = np.sort(m[s.brain & s.label]), np.sort(m[s.brain & ~s.label])
        t, f = counts_at_threshold(pos, neg, one["val_threshold"])
        tp, fp, n_pos = tp + t, fp + f, n_pos + pos.size
        found = lesion_detection((m >= one["val_threshold"]) & s.brain, s.label)
        n_lesions, n_detected = n_lesions + found["n_lesions"], n_detected + found["n_detected"]
    return {
        **{k: float(pooled[k]) for k in ("auroc", "auprc", "best_dice")},
        "dice_at_val_fpr": dice_from_counts(tp, fp, n_pos),
        "detection_rate": n_detected / n_lesions if n_lesions else math.nan,
        "image_auroc": math.nan,
        "val_thresholds": thresholds,
        "per_subject": [{**one["per_subject"][0]} for _, one in test],
    }


if __name__ == "__main__":
    sys.exit(main())
