"""Compare the two registration backends (SimpleITK and itk-elastix) on real scans.

For each scan: skull-strip and bias-correct once (as the chain does), register the brain
to the atlas with each backend, and print per subject the warped-mask Dice with the atlas
brain (the chain's quality ``mask_dice``), the NCC, the seconds, and the mean / max
distance between the two backends' transforms over the atlas brain voxels.

    python benchmarks/registration_compare.py ../shared/data/ixi-t1-2mm --atlas sri24@2mm
    python benchmarks/registration_compare.py ../shared/data/mslub/*/T1.nii.gz --skull-strip none
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uadct.atlas import load_atlas  # noqa: E402
from uadct.io import read_image  # noqa: E402
from uadct.preprocess.chain import _bias_correct, check_transform, registration_quality  # noqa: E402
from uadct.preprocess.masks import binarize_and_open  # noqa: E402
from uadct.preprocess.register import register_to_atlas  # noqa: E402
from uadct.preprocess.skullstrip import extract_brain_mask  # noqa: E402

BACKENDS = ("sitk", "elastix")


def scans(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        paths += sorted(path.glob("*.nii*")) if path.is_dir() else [path]
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--atlas", default="sri24@2mm")
    parser.add_argument("--skull-strip", default="deepbet")
    parser.add_argument("--kind", default="affine")
    parser.add_argument("--json", type=Path, help="write the per-subject rows here")
    parser.add_argument("--cache", type=Path, help="keep each scan's skull-stripped, bias-corrected brain and mask here (reruns skip them)")
    args = parser.parse_args()
    atlas = load_atlas(args.atlas)
    atlas_mask = sitk.GetArrayViewFromImage(atlas.mask) > 0
    points = [atlas.brain.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]]) for idx in np.argwhere(atlas_mask)]
    rows = []
    print(f"{'subject':28s} " + " ".join(f"{b + ' dice':>12s} {b + ' s':>9s} {'cpu s':>6s}" for b in BACKENDS) + "  disp mean/max mm")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for path in scans(args.inputs):
        row: dict = {"subject": path.parent.name if path.name.startswith("T1") else path.name.split(".")[0]}
        cached = [args.cache / f"{row['subject']}_{args.skull_strip}_{part}.nii.gz" for part in ("brain", "mask")] if args.cache else []
        if cached and all(p.exists() for p in cached):
            brain, mask = sitk.ReadImage(str(cached[0]), sitk.sitkFloat32), sitk.ReadImage(str(cached[1]), sitk.sitkUInt8)
        else:
            image = read_image(path)
            mask = extract_brain_mask(image, args.skull_strip, None, None)
            image, _ = _bias_correct(image, mask, "robust")
            brain = sitk.Mask(image, mask)
            if cached:
                args.cache.mkdir(parents=True, exist_ok=True)
                sitk.WriteImage(brain, str(cached[0]))
                sitk.WriteImage(mask, str(cached[1]))
        moved = {}
        for backend in BACKENDS:
            start, cpu = time.perf_counter(), time.process_time()
            registration = register_to_atlas(brain, atlas.brain, args.kind, backend=backend)
            row[f"{backend}_s"] = round(time.perf_counter() - start, 2)
            row[f"{backend}_cpu_s"] = round(time.process_time() - cpu, 2)
            transform = registration.atlas_to_subject
            check_transform(transform)
            warped = sitk.Resample(brain, atlas.brain, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            warped_mask = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), atlas.brain, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            opened = sitk.GetArrayFromImage(binarize_and_open(warped_mask, 0.5, 2))
            quality = registration_quality(sitk.GetArrayFromImage(warped), opened, atlas)
            row[f"{backend}_dice"], row[f"{backend}_ncc"] = quality["mask_dice"], quality["ncc"]
            moved[backend] = np.array([transform.TransformPoint(p) for p in points])
        distance = np.linalg.norm(moved["sitk"] - moved["elastix"], axis=1)
        row["disp_mean_mm"], row["disp_max_mm"] = round(float(distance.mean()), 3), round(float(distance.max()), 3)
        rows.append(row)
        print(f"{row['subject']:28s} " + " ".join(f"{row[b + '_dice']:12.4f} {row[b + '_s']:9.2f} {row[b + '_cpu_s']:6.2f}" for b in BACKENDS)
              + f"  {row['disp_mean_mm']:.2f} / {row['disp_max_mm']:.2f}", flush=True)
    if rows:
        print("\nsummary over", len(rows), "subjects (mean, min for Dice; first elastix call includes ITK loading)")
        for backend in BACKENDS:
            dice = np.array([r[f"{backend}_dice"] for r in rows])
            secs = np.array([r[f"{backend}_s"] for r in rows])
            cpu = np.array([r[f"{backend}_cpu_s"] for r in rows])
            print(f"  {backend:8s} Dice mean {dice.mean():.4f} min {dice.min():.4f}; seconds median {np.median(secs):.2f} "
                  f"(CPU {np.median(cpu):.2f}; first call {secs[0]:.2f} s, CPU {cpu[0]:.2f})")
        diff = np.array([r["sitk_dice"] - r["elastix_dice"] for r in rows])
        print(f"  Dice sitk - elastix: mean {diff.mean():+.4f} min {diff.min():+.4f} max {diff.max():+.4f}")
        mean = np.array([r["disp_mean_mm"] for r in rows])
        peak = np.array([r["disp_max_mm"] for r in rows])
        print(f"  displacement mean over subjects {mean.mean():.2f} mm (worst subject {mean.max():.2f}); max {peak.max():.2f} mm")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
