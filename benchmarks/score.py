"""Seconds per subject for scoring a prepared 1 mm subject, split by stage, and peak RSS.

    UADCT_HOME=/tmp/uadct_home python benchmarks/score.py [--batch-size 2048] [--no-3d]

The subject is the SRI24 brain on its own 1 mm grid (240 x 240 x 155) with the atlas brain
mask, i.e. what `uadct preprocess` hands to `uadct score`. The model is the `threshold`
model in intensity mode (an identity predictor), so the "model" column is the torch
round trip, not a network. Stages: grid (patch starts inside the mask), extraction
(cutting patches), model, aggregation (overlap-add + division). The aggregation of the
vectorised OverlapAccumulator is compared with the former patch-by-patch Python loop.

If MONAI is importable (it is not a dependency; e.g. `pip install --target /tmp/monai_pkgs
--no-deps monai` and PYTHONPATH=/tmp/monai_pkgs), the same volume and predictor also go
through monai.inferers.SlidingWindowInferer with roi_size (1, 16, 16) and overlap
(0, 0.75, 0.75), i.e. stride 4 in-plane, and the maps are compared inside the brain.
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from uadct.atlas import load_atlas
from uadct.models import build_model
from uadct.patches import OverlapAccumulator, PatchSpec, extract_patches, grid_starts, iterate_batches
from uadct.inference import patch_predictor


def loop_aggregate(shape: tuple[int, int, int], spec: PatchSpec, batches: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The former OverlapAccumulator.add: one Python iteration per patch (reference timing)."""
    total, count = np.zeros(shape), np.zeros(shape)
    dz, dy, dx = spec.shape
    for starts, values in batches:
        values = values.reshape((-1,) + spec.shape).astype(np.float64)
        for (z, y, x), value in zip(starts, values):
            total[z : z + dz, y : y + dy, x : x + dx] += value
            count[z : z + dz, y : y + dy, x : x + dx] += 1.0
    out = np.zeros(shape, np.float32)
    np.divide(total, count, out=out, where=count > 0, casting="unsafe")
    return out


def vector_aggregate(shape: tuple[int, int, int], spec: PatchSpec, batches: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The current OverlapAccumulator (np.add.at over flat indices) on the same outputs."""
    accumulator = OverlapAccumulator(shape, spec)
    for starts, values in batches:
        accumulator.add(starts, values)
    return accumulator.result()


def best_of(repeats: int, run: Callable[[], object]) -> float:
    """Shortest wall time of ``repeats`` runs (the machine is shared; the minimum is the least noisy)."""
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        run()
        times.append(time.perf_counter() - clock)
    return min(times)


def staged_map(
    volume: np.ndarray, mask: np.ndarray, predictor: Callable[[np.ndarray], np.ndarray], spec: PatchSpec,
    stride: int, batch_size: int, keep_outputs: bool = False,
) -> tuple[np.ndarray, dict[str, float], int, list[tuple[np.ndarray, np.ndarray]]]:
    """sliding_window_map with each stage timed (same calls, same order)."""
    seconds = {"grid": 0.0, "extraction": 0.0, "model": 0.0, "aggregation": 0.0}
    clock = time.perf_counter()
    starts = grid_starts(mask, spec, stride)
    seconds["grid"] = time.perf_counter() - clock
    accumulator = OverlapAccumulator(volume.shape, spec)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in iterate_batches(starts, batch_size):
        clock = time.perf_counter()
        patches = extract_patches(volume, batch, spec)
        seconds["extraction"] += time.perf_counter() - clock
        clock = time.perf_counter()
        values = predictor(patches)
        seconds["model"] += time.perf_counter() - clock
        clock = time.perf_counter()
        accumulator.add(batch, values)
        seconds["aggregation"] += time.perf_counter() - clock
        if keep_outputs:
            kept.append((batch, values))
    clock = time.perf_counter()
    result = accumulator.result()
    result[mask == 0] = 0.0
    seconds["aggregation"] += time.perf_counter() - clock
    return result, seconds, len(starts), kept


def monai_map(volume: np.ndarray, predictor: Callable[[np.ndarray], np.ndarray], batch_size: int) -> tuple[np.ndarray, float]:
    from monai.inferers import SlidingWindowInferer

    def network(patches: torch.Tensor) -> torch.Tensor:  # (B, 1, 1, 16, 16) -> same
        values = predictor(patches[:, 0, 0].numpy())
        return torch.from_numpy(values).reshape(patches.shape)

    inferer = SlidingWindowInferer(roi_size=(1, 16, 16), sw_batch_size=batch_size, overlap=(0.0, 0.75, 0.75), mode="constant")
    clock = time.perf_counter()
    with torch.inference_mode():
        out = inferer(torch.from_numpy(volume)[None, None], network)
    return out[0, 0].numpy(), time.perf_counter() - clock


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--no-3d", action="store_true", help="skip the 3D 32^3 aggregation row")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    atlas = load_atlas("sri24")
    mask = sitk.GetArrayFromImage(atlas.mask).astype(np.uint8)
    volume = sitk.GetArrayFromImage(atlas.brain).astype(np.float32)
    volume = volume / np.percentile(volume[mask > 0], 99)  # roughly the normalised range
    identity = patch_predictor(build_model("threshold").eval(), torch.device("cpu"))
    print(f"volume {volume.shape[::-1]} (x, y, z) voxels, {int(mask.sum())} brain voxels, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, RSS after loading {peak_rss_mib():.0f} MiB")

    rows = []
    spec2d = PatchSpec(16, 2)
    result, seconds, count, kept = staged_map(volume, mask, identity, spec2d, args.stride, args.batch_size, keep_outputs=True)
    assert np.array_equal(result[mask > 0], volume[mask > 0]), "identity map must reconstruct the brain exactly"
    vector_seconds, loop_seconds = best_of(3, lambda: vector_aggregate(volume.shape, spec2d, kept)), best_of(3, lambda: loop_aggregate(volume.shape, spec2d, kept))
    del kept
    rows.append((f"2D 16 px stride {args.stride}", count, seconds, vector_seconds, loop_seconds))
    if not args.no_3d:  # aggregation only, on a subset (3D outputs of all patches would need GBs)
        spec3d = PatchSpec(32, 3)
        starts3d = grid_starts(mask, spec3d, args.stride)
        subset = starts3d[np.linspace(0, len(starts3d) - 1, 2048).astype(int)]
        values3d = extract_patches(volume, subset, spec3d)
        batches3d = [(subset[b], values3d[b]) for b in iterate_batches(np.arange(len(subset)), 256)]
        scale = len(starts3d) / len(subset)
        accumulator = OverlapAccumulator(volume.shape, spec3d)
        clock = time.perf_counter()
        for starts, values in batches3d:
            accumulator.add(starts, values)
        adding = time.perf_counter() - clock
        clock = time.perf_counter()
        accumulator.result()
        vector3d = adding + (time.perf_counter() - clock) / scale  # only the adds grow with the patch count
        loop3d = best_of(1, lambda: loop_aggregate(volume.shape, spec3d, batches3d))
        del accumulator
        nan = float("nan")
        rows.append((f"3D 32 px stride {args.stride} *", len(starts3d),
                     {"grid": nan, "extraction": nan, "model": nan, "aggregation": nan}, vector3d * scale, loop3d * scale))
        del values3d, batches3d

    print()
    header = (f"{'patches':<20}{'count':>9}{'grid s':>9}{'extract s':>11}{'model s':>9}{'aggr s':>9}{'total s':>9}"
              f"{'| aggr vector s':>16}{'aggr loop s':>13}{'speed-up':>10}")
    print(header)
    print("-" * len(header))
    for name, n, s, vector, loop in rows:
        total = sum(s.values())
        print(f"{name:<20}{n:>9}{s['grid']:>9.2f}{s['extraction']:>11.2f}{s['model']:>9.2f}{s['aggregation']:>9.2f}"
              f"{total:>9.2f}{vector:>16.2f}{loop:>13.2f}{loop / vector:>9.1f}x")
    print("stage columns: one pass of score_volume's loop; 'aggr vector/loop': best of 3 (2D) re-aggregations of the same outputs")
    if not args.no_3d:
        print("* 3D: aggregation only; the adds of 2048 of the patches timed and scaled to all of them (+ one result())")
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB (whole process, including the kept patch outputs for the loop reference)")

    try:
        import monai  # noqa: F401
    except ImportError:
        print("monai not importable: no SlidingWindowInferer comparison")
        return
    reference, monai_seconds = monai_map(volume, identity, args.batch_size)
    uadct_clock = time.perf_counter()
    ours, _, _, _ = staged_map(volume, mask, identity, spec2d, args.stride, args.batch_size)
    uadct_seconds = time.perf_counter() - uadct_clock
    brain = mask > 0
    difference = float(np.abs(reference[brain] - ours[brain]).max())

    def centred(patches: np.ndarray) -> np.ndarray:  # a context-dependent predictor
        return identity(patches) - patches.mean(axis=(-2, -1), keepdims=True)

    reference_c, monai_c = monai_map(volume, centred, args.batch_size)
    ours_c, _, _, _ = staged_map(volume, mask, centred, spec2d, args.stride, args.batch_size)
    difference_c = float(np.abs(reference_c[brain] - ours_c[brain]).max())
    print(f"\n{'2D 16 px stride 4':<28}{'seconds':>9}{'max |diff| in brain':>22}")
    print(f"{'uadct (patches in brain)':<28}{uadct_seconds:>9.2f}{'':>22}")
    print(f"{'MONAI identity':<28}{monai_seconds:>9.2f}{difference:>22.2e}")
    print(f"{'MONAI patch-centred':<28}{monai_c:>9.2f}{difference_c:>22.2e}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB; monai {monai.__version__}")


if __name__ == "__main__":
    main()
