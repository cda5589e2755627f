"""Preprocessing speed per step and registration accuracy against a demo cohort's known truth.

    python benchmarks/preprocess.py --subjects 4 --output /tmp/uadct_bench [--reuse] [--jobs 2]

Generates (or, with ``--reuse``, keeps) a demo cohort of healthy subjects under
``OUTPUT/cohort``, preprocesses it into ``OUTPUT/prep`` with the default MR chain and
prints:

(a) seconds per subject for each step (mean, min, max), from the sidecars' ``timings_s``;
(b) registration error in mm: for every 400th brain voxel of the atlas, the distance
    between where the estimated ``atlas_to_subject.tfm`` sends it and where the true
    generating transform (inverted, ``uadct.demo.atlas_to_subject``) sends it. The truth
    has a small elastic part an affine cannot represent, so the error of the best affine
    fit (least squares over the same points) is printed beside it as the floor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uadct.atlas import load_atlas
from uadct.demo import atlas_to_subject, generate_cohort, read_truth_transform
from uadct.preprocess.batch import preprocess_many
from uadct.preprocess.chain import subject_id
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.register import load_affine

POINT_STRIDE = 400  # every 400th atlas brain voxel (~3,500 points for SRI24)


def atlas_brain_points(atlas, stride: int = POINT_STRIDE) -> np.ndarray:
    """Physical LPS points (N, 3) of every ``stride``-th brain voxel of the atlas."""
    index_zyx = np.argwhere(sitk.GetArrayViewFromImage(atlas.mask) > 0)[::stride]
    return np.array([atlas.mask.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in idx[::-1])) for idx in index_zyx])


def best_affine_fit(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Where the least-squares affine from ``source`` to ``target`` (both (N, 3)) sends ``source``."""
    design = np.hstack([source, np.ones((len(source), 1))])
    coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
    return design @ coefficients


def registration_errors(prep_dir: Path, cohort_dir: Path, subjects: list[str], points: np.ndarray) -> dict[str, dict[str, float]]:
    rows = {}
    for sid in subjects:
        estimated = load_affine(prep_dir / sid / "atlas_to_subject.tfm")
        truth = atlas_to_subject(points, read_truth_transform(cohort_dir / "truth" / f"{sid}.json"))
        mapped = np.array([estimated.TransformPoint(tuple(p)) for p in points])
        error = np.linalg.norm(mapped - truth, axis=1)
        floor = np.linalg.norm(best_affine_fit(points, truth) - truth, axis=1)
        rows[sid] = {"mean": float(error.mean()), "max": float(error.max()),
                     "floor_mean": float(floor.mean()), "floor_max": float(floor.max())}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4, help="number of demo subjects (healthy)")
    parser.add_argument("--output", type=Path, default=Path("benchmark_preprocess"), help="working folder")
    parser.add_argument("--reuse", action="store_true", help="keep an existing cohort and complete prepared subjects")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for preprocessing")
    parser.add_argument("--voxel-scale", type=float, default=1.0, help="demo voxel size factor (1 = full resolution)")
    args = parser.parse_args()

    cohort_dir, prep_dir = args.output / "cohort", args.output / "prep"
    scans = [cohort_dir / "healthy" / f"sub-h{i:03d}.nii.gz" for i in range(args.subjects)]
    atlas = load_atlas("sri24")
    if not (args.reuse and all(p.is_file() for p in scans)):
        start = time.perf_counter()
        scans = generate_cohort(cohort_dir, n_healthy=args.subjects, n_test=0, atlas=atlas, voxel_scale=args.voxel_scale).healthy
        print(f"cohort: {len(scans)} subjects generated in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    outcome = preprocess_many(scans, prep_dir, PreprocessConfig(), force=not args.reuse, jobs=args.jobs)
    wall = time.perf_counter() - start
    print(f"preprocess: {len(outcome.done)} done, {len(outcome.skipped)} reused, {len(outcome.failed)} failed "
          f"in {wall:.1f} s wall ({args.jobs} job(s))")
    for path, error in outcome.failed:
        print(f"  failed {path}: {error}")
    subjects = [subject_id(p) for p in scans if (prep_dir / subject_id(p) / "preprocess.json").is_file()]

    sidecars = {sid: json.loads((prep_dir / sid / "preprocess.json").read_text(encoding="utf-8")) for sid in subjects}
    steps = list(next(iter(sidecars.values()))["timings_s"])
    print("\n(a) seconds per subject per step")
    print("step".ljust(18) + "mean".rjust(9) + "min".rjust(9) + "max".rjust(9))
    totals = []
    for step in steps + ["total"]:
        values = np.array([sum(d["timings_s"].values()) if step == "total" else d["timings_s"].get(step, np.nan)
                           for d in sidecars.values()])
        totals.append(values)
        print(step.ljust(18) + f"{np.nanmean(values):9.2f}{np.nanmin(values):9.2f}{np.nanmax(values):9.2f}")

    points = atlas_brain_points(atlas)
    rows = registration_errors(prep_dir, cohort_dir, subjects, points)
    print(f"\n(b) registration error over {len(points)} atlas brain points (mm); floor = best affine fit to the truth")
    print("subject".ljust(12) + "mean".rjust(8) + "max".rjust(8) + "floor mean".rjust(12) + "floor max".rjust(11) + "mask Dice".rjust(11))
    for sid, row in rows.items():
        print(sid.ljust(12) + f"{row['mean']:8.3f}{row['max']:8.3f}{row['floor_mean']:12.3f}{row['floor_max']:11.3f}"
              + f"{sidecars[sid]['quality']['mask_dice']:11.3f}")
    overall = {key: (np.mean if key.endswith("mean") else np.max)([r[key] for r in rows.values()]) for key in ("mean", "max", "floor_mean", "floor_max")}
    print("overall".ljust(12) + f"{overall['mean']:8.3f}{overall['max']:8.3f}{overall['floor_mean']:12.3f}{overall['floor_max']:11.3f}")
    print(f"goal mean < 1 mm: {'met' if overall['mean'] < 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
