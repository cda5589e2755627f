"""Does the preprocessing chain keep a lesion's contrast? Old chain vs new chain vs the raw intensity.

    python benchmarks/lesion_contrast.py ../shared/data [--ixi 3] [--seed 0]

Cases (real scans, not part of the project; see DATA_DIR/README.md):
- ``mslub/patientNN/FLAIR.nii.gz`` with its consensus lesion mask (real MS lesions;
  already skull-stripped, so ``--skull-strip none``);
- the first ``--ixi`` raw 2 mm IXI T1s with skull (``ixi-t1-2mm/``), each with one large
  inserted lesion on its raw grid: a textured blob of radius 15-22 mm, soft edges (2 mm),
  60-90 % brighter than its surroundings, seeded; the lesion mask is where the blob is at
  least half its full strength.

Each case goes through the whole chain (skull-strip, N4, affine registration to SRI24,
resampling, normalisation) with each chain setting, and the `threshold` model's
``intensity`` map (the normalised intensity inside the chain's brain mask: what
`uadct score` writes for it) is taken back to the scan's own grid as `uadct score` does.
Metrics are computed on the native grid inside one brain mask per case (the scan's
non-zero voxels for MSLUB, deepbet's mask for IXI): per subject AUROC and AUPRC, and
pooled over the subjects of each data set (all voxels together, so a normalisation that
moves with the lesion costs pooled AUPRC). ``raw`` is the unprocessed scan's intensity.
Per-step seconds of each chain are printed from its timings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from uadct.atlas import load_atlas
from uadct.metrics import voxel_metrics
from uadct.preprocess.chain import run_preprocessing
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.skullstrip import extract_brain_mask

CHAINS = {
    "old": {"bias_correction_method": "n4", "normalization": "percentile"},
    "new": {"bias_correction_method": "robust", "normalization": "tissue"},
}
ABLATIONS = {
    "robust+pct": {"bias_correction_method": "robust", "normalization": "percentile"},
    "n4+tissue": {"bias_correction_method": "n4", "normalization": "tissue"},
    "no-N4+tissue": {"bias_correction": False, "normalization": "tissue"},
}


def insert_blob(image: sitk.Image, brain: np.ndarray, rng: np.random.Generator) -> tuple[sitk.Image, np.ndarray]:
    """A large, soft-edged, textured hyper-intense blob deep in ``brain``; returns the scan and the lesion mask."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = np.array(image.GetSpacing()[::-1])  # (z, y, x) mm
    radius = float(rng.uniform(15.0, 22.0))
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    candidates = np.argwhere(depth > radius + 4.0)
    if candidates.size == 0:
        candidates = np.argwhere(depth >= 0.8 * depth.max())
    centre = candidates[rng.integers(len(candidates))]
    grid = np.indices(array.shape).astype(np.float32)
    distance = np.sqrt(sum(((grid[i] - centre[i]) * spacing[i]) ** 2 for i in range(3)))
    wobble = ndimage.gaussian_filter(rng.normal(size=array.shape), 6.0 / spacing.mean())
    wobble *= 0.25 * radius / (np.abs(wobble).max() + 1e-9)  # irregular outline, +-25 % of the radius
    profile = 1.0 / (1.0 + np.exp((distance + wobble - radius) / 2.0))  # soft edge, 2 mm
    texture = 1.0 + 0.1 * ndimage.gaussian_filter(rng.normal(size=array.shape), 1.0) / 0.2
    contrast = float(rng.uniform(0.6, 0.9))
    lesioned = array * (1.0 + contrast * profile * texture) * brain + array * ~brain
    out = sitk.GetImageFromArray(lesioned.astype(np.float32))
    out.CopyInformation(image)
    return out, (profile >= 0.5) & brain


def native_map(image: sitk.Image, config: PreprocessConfig, atlas) -> tuple[np.ndarray, dict[str, float]]:
    """The threshold model's intensity map on the scan's own grid, and the chain's per-step seconds."""
    result = run_preprocessing(image, config, atlas)
    atlas_map = sitk.Mask(result.image, result.mask)
    back = result.atlas_to_subject.GetInverse()
    native = sitk.Resample(atlas_map, image, back, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    native_mask = sitk.Resample(result.mask, image, back, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(sitk.Mask(native, native_mask)), result.timings


def cases(data_dir: Path, n_ixi: int, seed: int):
    """(data set, subject, scan, lesion mask, evaluation brain mask, skull-strip) for every case."""
    for folder in sorted((data_dir / "mslub").glob("patient*")):
        image = sitk.ReadImage(str(folder / "FLAIR.nii.gz"), sitk.sitkFloat32)
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "lesion.nii.gz"))) > 0
        yield "MSLUB FLAIR", folder.name, image, lesion, sitk.GetArrayFromImage(image) > 0, "none"
    rng = np.random.default_rng(seed)
    for path in sorted((data_dir / "ixi-t1-2mm").glob("*.nii.gz"))[:n_ixi]:
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        brain = sitk.GetArrayFromImage(extract_brain_mask(image, "deepbet")) > 0
        lesioned, lesion = insert_blob(image, brain, rng)
        yield "IXI T1 + blob", path.name.split("-")[0], lesioned, lesion, brain, "deepbet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--ixi", type=int, default=3, help="IXI subjects with an inserted lesion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablations", action="store_true", help="also each new step alone")
    args = parser.parse_args()
    chains = {**CHAINS, **(ABLATIONS if args.ablations else {})}
    atlas = load_atlas("sri24")
    names = ["raw", *chains]
    pooled: dict[str, dict[str, list]] = {}
    steps: dict[str, list[dict[str, float]]] = {name: [] for name in chains}
    print(f"{'data set':14} {'subject':11} {'lesion ml':>9} " + " ".join(f"{n + ' AUROC/AUPRC':>24}" for n in names))
    for dataset, subject, image, lesion, brain, skull_strip in cases(args.data_dir, args.ixi, args.seed):
        maps = {"raw": sitk.GetArrayFromImage(image)}
        for name, overrides in chains.items():
            config = PreprocessConfig.for_modality("mr", skull_strip=skull_strip, **overrides)
            start = time.perf_counter()
            maps[name], timings = native_map(image, config, atlas)
            steps[name].append({**timings, "total": time.perf_counter() - start})
        row = []
        for name in names:
            scores, labels = maps[name][brain], lesion[brain]
            metrics = voxel_metrics(scores, labels)
            bucket = pooled.setdefault(dataset, {}).setdefault(name, [[], []])
            bucket[0].append(scores)
            bucket[1].append(labels)
            row.append(f"{metrics['auroc']:.3f} / {metrics['auprc']:.3f}")
        ml = lesion.sum() * float(np.prod(image.GetSpacing())) / 1000.0
        print(f"{dataset:14} {subject:11} {ml:9.1f} " + " ".join(f"{r:>24}" for r in row), flush=True)
    for dataset, by_name in pooled.items():
        row = []
        for name in names:
            metrics = voxel_metrics(np.concatenate(by_name[name][0]), np.concatenate(by_name[name][1]))
            row.append(f"{metrics['auroc']:.3f} / {metrics['auprc']:.3f}")
        print(f"{dataset:14} {'pooled':11} {'':9} " + " ".join(f"{r:>24}" for r in row))
    print("\nseconds per subject (mean over cases), per step:")
    for name, records in steps.items():
        keys = sorted({k for r in records for k in r})
        print(f"  {name:12} " + "  ".join(f"{k} {np.mean([r.get(k, 0.0) for r in records]):.2f}" for k in keys))


if __name__ == "__main__":
    main()
