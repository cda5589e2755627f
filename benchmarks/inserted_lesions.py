"""Quick check of trained models against the intensity baseline on prepared scans with inserted lesions.

A stop-gap until ``benchmarks/realdata.py`` (raw-grid insertion, the whole chain, MSLUB) is in
place: lesions are inserted **on the atlas grid** of prepared held-out subjects (already
skull-stripped, N4-corrected, registered and normalised), so this measures the models, not
preprocessing. Lesions are irregular (a union of 2-4 overlapping balls), soft-edged (Gaussian
blurred), textured, hyper- or hypo-intense relative to white matter, 3-30 mm across. The
generator is independent of the ``synthetic-anomaly`` model's training anomalies.

Usage (prep folders from `uadct preprocess`, checkpoints from `uadct train`)::

    python benchmarks/inserted_lesions.py --test prep_test/ --train prep_train/ \\
        --checkpoints syn.pt dae.pt --clean 4 --seed 0 --stride 32

Prints one table: pooled voxel AUROC, AUPRC, best Dice over the lesioned subjects' brains,
Dice at a threshold fixed to 1% voxel false positives on the clean held-out subjects, and
the seconds per subject for scoring. Baselines: intensity, and |x - median| / MAD and its
upper and lower halves with the median and MAD of the training subjects' brain voxels.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from uadct.metrics import counts_at_threshold, dice_from_counts, threshold_at_fpr, voxel_metrics_from_groups


def read_prepared(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "image.nii.gz"))).astype(np.float32)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mask.nii.gz"))) > 0
    return image, mask


def insert_lesions(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, count: int = 3,
                   spacing_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """``(lesioned image, lesion label)``: ``count`` irregular soft lesions inside the eroded brain."""
    inner = ndimage.binary_erosion(mask, iterations=3)
    candidates = np.argwhere(inner)
    brain = image[mask]
    white = float(np.percentile(brain, 90))  # white matter on T1 (the bright tissue)
    out, label = image.copy(), np.zeros(mask.shape, bool)
    grid = np.indices(mask.shape).astype(np.float32)
    for _ in range(count):
        diameter_mm = float(np.exp(rng.uniform(np.log(3.0), np.log(30.0))))
        radius = 0.5 * diameter_mm / spacing_mm
        centre = candidates[rng.integers(len(candidates))].astype(np.float32)
        blob = np.zeros(mask.shape, bool)
        for _ in range(int(rng.integers(2, 5))):
            offset = rng.normal(0, 0.4 * radius, 3)
            r = radius * rng.uniform(0.5, 1.0)
            blob |= ((grid - (centre + offset)[:, None, None, None]) ** 2).sum(0) <= max(r, 0.8) ** 2
        soft = ndimage.gaussian_filter(blob.astype(np.float32), 0.7) * mask
        hyper = rng.random() < 0.5
        level = white * (rng.uniform(1.25, 1.6) if hyper else rng.uniform(0.25, 0.6))
        texture = 1.0 + 0.08 * ndimage.gaussian_filter(rng.normal(size=mask.shape).astype(np.float32), 1.0) / 0.16
        out = out + soft * (level * texture - out)
        label |= (soft > 0.5) & mask
    return out, label


def pooled(maps: list[np.ndarray], labels: list[np.ndarray], masks: list[np.ndarray],
           clean_maps: list[np.ndarray], clean_masks: list[np.ndarray]) -> dict[str, float]:
    positives = np.concatenate([m[l & k] for m, l, k in zip(maps, labels, masks)])
    negatives = np.concatenate([m[~l & k] for m, l, k in zip(maps, labels, masks)])
    result = voxel_metrics_from_groups(positives.copy(), negatives.copy(), overwrite_input=True)
    healthy = np.sort(np.concatenate([m[k] for m, k in zip(clean_maps, clean_masks)]))
    threshold = threshold_at_fpr(np.sort(positives), healthy, 0.01)
    tp, fp = counts_at_threshold(np.sort(positives), np.sort(negatives), threshold)
    return {"auroc": result["auroc"], "auprc": result["auprc"], "best_dice": result["best_dice"],
            "dice_fpr1": dice_from_counts(tp, fp, positives.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, required=True, help="prepared held-out subjects")
    parser.add_argument("--train", type=Path, required=True, help="prepared training subjects (baseline statistics)")
    parser.add_argument("--checkpoints", type=Path, nargs="*", default=[])
    parser.add_argument("--clean", type=int, default=4, help="held-out subjects kept lesion-free (threshold at 1%% FPR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stride", type=int, default=32)
    args = parser.parse_args()

    from uadct.checkpoint import load_checkpoint
    from uadct.inference import score_volume

    rng = np.random.default_rng(args.seed)
    subjects = sorted(p for p in args.test.iterdir() if (p / "image.nii.gz").exists())
    clean_subjects, lesion_subjects = subjects[: args.clean], subjects[args.clean :]
    clean = [read_prepared(p) for p in clean_subjects]
    lesioned = []
    for folder in lesion_subjects:
        image, mask = read_prepared(folder)
        lesioned.append((*insert_lesions(image, mask, rng), mask))
    train_voxels = np.concatenate([image[mask][::7] for image, mask in (read_prepared(p) for p in sorted(args.train.iterdir())[:20])])
    median = float(np.median(train_voxels))
    mad = float(np.median(np.abs(train_voxels - median)))
    maps: dict[str, tuple[list[np.ndarray], list[np.ndarray], float]] = {}
    baselines = {
        "intensity": lambda x: x,
        "threshold deviation |x-med|/MAD": lambda x: np.abs(x - median) / mad,
        "threshold upper": lambda x: np.clip(x - median, 0, None) / mad,
        "threshold lower": lambda x: np.clip(median - x, 0, None) / mad,
    }
    for name, function in baselines.items():
        maps[name] = ([function(x) for x, _, _ in lesioned], [function(x) for x, _ in clean], 0.0)
    for path in args.checkpoints:
        checkpoint = load_checkpoint(path)
        started = time.perf_counter()
        lesion_maps = [score_volume(checkpoint, x, k.astype(np.uint8), stride=args.stride, device="cpu") for x, _, k in lesioned]
        clean_maps = [score_volume(checkpoint, x, k.astype(np.uint8), stride=args.stride, device="cpu") for x, k in clean]
        seconds = (time.perf_counter() - started) / (len(lesioned) + len(clean))
        maps[f"{checkpoint.metadata['model']} ({path.name})"] = (lesion_maps, clean_maps, seconds)
    lesion_voxels = sum(int(l.sum()) for _, l, _ in lesioned)
    print(f"{len(lesioned)} lesioned + {len(clean)} clean held-out subjects, {lesion_voxels} lesion voxels, seed {args.seed}")
    print("| map | AUROC | AUPRC | best Dice | Dice @1% FPR (healthy) | s/subject |")
    print("|---|---|---|---|---|---|")
    for name, (lesion_maps, clean_maps, seconds) in maps.items():
        r = pooled(lesion_maps, [l for _, l, _ in lesioned], [k for _, _, k in lesioned], clean_maps, [k for _, k in clean])
        print(f"| {name} | {r['auroc']:.3f} | {r['auprc']:.3f} | {r['best_dice']:.3f} | {r['dice_fpr1']:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
