"""Benchmark figures of the shipped pretrained T1 model beside the threshold baseline.

    python benchmarks/pretrained_eval.py ../shared/data -o bench_out/pretrained_eval \
        --train-prep bench_out/pretrained/train-N     # the prepared subjects the model was built from

Tests (the real scans in DATA, never copied):
- ``ixi``: the first ``--test`` IXI subjects held out by ``benchmarks/realdata.py``'s fixed split
  (never seen by the shipped model), lesions inserted on their raw native grid with
  :mod:`uadct.lesions` (seeded like realdata.py: ``[seed, index]``, for each of ``--seeds``: mean ±
  std over them), preprocessed with the model's own chain as `uadct score` runs it (finer scans
  blurred to its training resolution), scored, mapped back to the native grid; clean copies give
  image-level AUROC.
- ``mslub-t1``: the 3 MSLUB T1 scans (skull-stripped, 1 mm MNI) with their consensus lesions.

Rows: the shipped checkpoint, and the ``threshold`` model (modes intensity, deviation) fitted and
calibrated on ``--train-prep`` (the same subjects, the same split). Metrics: pooled voxel AUROC,
AUPRC, best Dice inside the native brain mask, and Dice of each model's own ``--fpr 0.01`` mask (the
threshold calibrated on its healthy validation subjects, never on the test set), lesion detection
rate of that mask, image-level AUROC (ixi: lesioned vs clean, top-1000 mean). Prints a markdown
table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uadct.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from uadct.io import read_image, write_image, write_json  # noqa: E402
from uadct.lesions import describe, draw_lesions, insert_lesions  # noqa: E402
from uadct.metrics import auroc, dice, lesion_detection, voxel_metrics  # noqa: E402
from uadct.postprocess import MapOptions  # noqa: E402
from uadct.preprocess.batch import preprocess_many  # noqa: E402
from uadct.preprocess.config import PreprocessConfig  # noqa: E402
from uadct.preprocess.prepared import find_prepared, load_prepared  # noqa: E402
from uadct.preprocess.resolution import harmonized_config  # noqa: E402
from uadct.pretrained import resolve_checkpoint  # noqa: E402
from uadct.inference import score_scan  # noqa: E402
from uadct.training import TrainConfig, train_model  # noqa: E402

log = logging.getLogger("pretrained_eval")
SPLIT_SEED = 20261129
MSLUB = ("patient07", "patient19", "patient26")
FPR = 0.01


def held_out(data: Path, count: int) -> list[Path]:
    scans = sorted((data / "ixi-t1-2mm").glob("*.nii.gz"))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(scans))
    return sorted(scans[i] for i in order[:count])


def native_brain(prepared_dir: Path) -> np.ndarray:
    prepared = load_prepared(prepared_dir)
    native = sitk.Resample(prepared.mask, prepared.native_reference, prepared.atlas_to_subject.GetInverse(),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(native) > 0


def lesioned_copies(clean: list[Path], seed: int, folder: Path) -> list[Path]:
    """Raw lesioned copies (native grid) and labels ``folder/labels/<name>-les.nii.gz``."""
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    made = []
    for index, prepared_dir in enumerate(clean):
        name = prepared_dir.name
        out, label_path = folder / "raw" / f"{name}-les.nii.gz", folder / "labels" / f"{name}-les.nii.gz"
        if not (out.is_file() and label_path.is_file()):
            source = Path(json.loads((prepared_dir / "preprocess.json").read_text(encoding="utf-8"))["input"]["path"])
            image = read_image(source)
            brain = native_brain(prepared_dir)
            spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
            lesions = draw_lesions(brain, spacing, np.random.default_rng([seed, index]))
            array, label = insert_lesions(sitk.GetArrayFromImage(image), brain, spacing, lesions)
            for array_, path in ((label, label_path), (array, out)):
                written = sitk.GetImageFromArray(array_)
                written.CopyInformation(image)
                write_image(written, path)
            write_json({"source": str(source), "seed": [seed, index], "lesions": describe(lesions)}, label_path.with_suffix(".json"))
        made.append(out)
    return made


def score(checkpoint: Checkpoint, prepared_dir: Path, out: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(native map, native --fpr 0.01 mask, image score) of a prepared subject."""
    result = score_scan(checkpoint, prepared_dir, out / f"{prepared_dir.name}.nii.gz", device="cpu",
                        map_options=MapOptions(fpr=FPR), lesion_mask_path=out / f"{prepared_dir.name}_mask.nii.gz")
    anomaly = sitk.GetArrayFromImage(read_image(result.map_path, allow_empty=True))
    mask = sitk.GetArrayFromImage(read_image(out / f"{prepared_dir.name}_mask.nii.gz", allow_empty=True)) > 0
    return anomaly, mask, result.image_score


def evaluate(checkpoint: Checkpoint, subjects: list[tuple[Path, np.ndarray | None]], clean: list[Path], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    scores, truths, rows = [], [], []
    tp = fp = positives = found = lesions = 0
    image_scores, image_labels = [], []
    for prepared_dir, label in subjects:
        brain = native_brain(prepared_dir)
        anomaly, flagged, image_score = score(checkpoint, prepared_dir, out)
        truth = label & brain
        scores.append(anomaly[brain])
        truths.append(truth[brain])
        tp += int((flagged & truth).sum())
        fp += int((flagged & brain & ~truth).sum())
        positives += int(truth.sum())
        detected = lesion_detection(flagged & brain, truth)
        found, lesions = found + detected["n_detected"], lesions + detected["n_lesions"]
        metrics = voxel_metrics(anomaly[brain], truth[brain])
        rows.append({"subject": prepared_dir.name, "auroc": metrics["auroc"], "auprc": metrics["auprc"],
                     "best_dice": metrics["best_dice"], "dice_at_fpr": dice(flagged & brain, truth)})
        image_scores.append(image_score)
        image_labels.append(True)
    for prepared_dir in clean:
        brain = native_brain(prepared_dir)
        anomaly, flagged, image_score = score(checkpoint, prepared_dir, out)
        scores.append(anomaly[brain])
        truths.append(np.zeros(int(brain.sum()), bool))
        fp += int((flagged & brain).sum())
        image_scores.append(image_score)
        image_labels.append(False)
    pooled = voxel_metrics(np.concatenate(scores), np.concatenate(truths))
    result = {"auroc": pooled["auroc"], "auprc": pooled["auprc"], "best_dice": pooled["best_dice"],
              "dice_at_fpr": 2 * tp / max(1, 2 * tp + fp + (positives - tp)), "detection_rate": found / max(1, lesions),
              "per_subject": rows}
    if clean:
        result["image_auroc"] = auroc(np.array(image_scores), np.array(image_labels))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_out/pretrained_eval"))
    parser.add_argument("--model", default="t1", help="pretrained name or checkpoint")
    parser.add_argument("--train-prep", type=Path, required=True, help="prepared training subjects (for the threshold baseline)")
    parser.add_argument("--test", type=int, default=4, help="held-out IXI subjects (the first of realdata.py's split)")
    parser.add_argument("--seeds", default="0", help="lesion-insertion seeds, comma-separated (e.g. 0,1,2: mean and std)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--also", action="append", default=[], metavar="ROW=CHECKPOINT",
                        help="more checkpoints to evaluate beside the shipped one (same chain), e.g. a variant")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = options.output
    shipped = load_checkpoint(resolve_checkpoint(options.model))
    # the model's own chain, as `uadct score` runs it: finer scans (MSLUB's 1 mm) blurred to its training resolution
    config = harmonized_config(PreprocessConfig.from_dict(shipped.preprocess), shipped.metadata)
    clean_raw = held_out(options.data, options.test)
    mslub_raw = out / "inputs" / "mslub-t1"
    mslub_raw.mkdir(parents=True, exist_ok=True)
    for patient in MSLUB:
        link = mslub_raw / f"{patient}.nii.gz"
        if not link.is_symlink():
            link.symlink_to((options.data / "mslub" / patient / "T1.nii.gz").resolve())
    preprocess_many(clean_raw + sorted(mslub_raw.glob("*.nii.gz")), out / "prep", config, jobs=options.jobs)
    names = {p.name.split(".nii")[0] for p in clean_raw}
    clean = [p for p in find_prepared(out / "prep") if p.name in names]
    seeds = [int(v) for v in options.seeds.split(",")]
    lesioned_by_seed = {seed: lesioned_copies(clean, seed, out / f"lesioned-seed{seed}") for seed in seeds}
    for seed in seeds:  # one folder per seed: the lesioned copies of every seed share their names
        preprocess_many(lesioned_by_seed[seed], out / f"prep-lesioned-seed{seed}", config, jobs=options.jobs)
    if options.prepare_only:
        return 0
    prepared = {p.name: p for p in find_prepared(out / "prep")}
    mslub = [(prepared[p], sitk.GetArrayFromImage(read_image(options.data / "mslub" / p / "lesion.nii.gz")) > 0) for p in MSLUB]
    models: dict[str, Checkpoint] = {f"pretrained {options.model}": shipped}
    for item in options.also:
        row, _, path = item.rpartition("=")
        models[row] = load_checkpoint(path)
    for mode in ("intensity", "deviation"):
        path = out / "models" / f"threshold-{mode}.pt"
        if not path.is_file():
            train_model(options.train_prep, path, TrainConfig(model="threshold", model_options={"mode": mode}, device="cpu",
                                                              workers=0, calibration_subjects=1000), resume=False)
        baseline = load_checkpoint(path)
        # trained on the same prepared subjects as the shipped model; when those were a reused preparation
        # (build_pretrained.py --prepared) their template file was verified identical to the model's atlas
        baseline.metadata["preprocess"] = {**baseline.metadata["preprocess"], "atlas": shipped.preprocess["atlas"]}
        models[f"threshold {mode}"] = baseline
    results: dict[str, dict[str, Any]] = {}
    for row, checkpoint in models.items():
        folder = out / "maps" / row.replace(" ", "-")
        results[row] = {"mslub-t1": evaluate(checkpoint, mslub, [], folder / "mslub-t1")}
        for seed in seeds:
            labels = out / f"lesioned-seed{seed}" / "labels"
            seed_prep = out / f"prep-lesioned-seed{seed}"
            ixi = [(seed_prep / p.name.split(".nii")[0], sitk.GetArrayFromImage(read_image(labels / p.name)) > 0)
                   for p in lesioned_by_seed[seed]]
            results[row][f"ixi-seed{seed}"] = evaluate(checkpoint, ixi, clean, folder / f"ixi-seed{seed}")
    write_json({"results": results, "test_subjects": [p.name for p in clean], "seeds": seeds}, out / "results.json")
    print(f"| model | IXI AUROC | IXI AUPRC | IXI best Dice | IXI Dice@{FPR:g} FPR | IXI detected | IXI image AUROC | "
          f"MSLUB T1 AUROC | MSLUB T1 AUPRC | MSLUB T1 best Dice | MSLUB T1 Dice@{FPR:g} FPR |")
    print("|---|" + "---|" * 10)
    for row, r in results.items():
        b = r["mslub-t1"]
        ixi_cells = []
        for key in ("auroc", "auprc", "best_dice", "dice_at_fpr", "detection_rate", "image_auroc"):
            values = np.array([r[f"ixi-seed{seed}"].get(key, float("nan")) for seed in seeds], dtype=float)
            ixi_cells.append(f"{values.mean():.3f} ± {values.std():.3f}" if len(seeds) > 1 else f"{values[0]:.3f}")
        print(f"| {row} | " + " | ".join(ixi_cells) + f" | {b['auroc']:.3f} | {b['auprc']:.3f} | "
              f"{b['best_dice']:.3f} | {b['dice_at_fpr']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
