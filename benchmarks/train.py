"""Patches per second of the patch sampler (in DataLoader workers, as training runs it)
and of one training step per model.

    python benchmarks/train.py [--prep demo_out/prep] [--patch-size 16] [--batch-size 128]
                               [--workers 4] [--augment flip,gmm] [--amp]

Uses prepared subjects when given (e.g. the demo's; read memory-mapped from their
array cache), else the SRI24 brain itself as a prepared volume. The sampler should be
at least 3x faster than the slowest training step, so that a GPU is never starved by
data preparation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from uadct.augment import ContrastAugmenter, fit_tissue_gmm
from uadct.models import build_model, patch_models
from uadct.patches import PatchSpec, valid_training_starts
from uadct.device import autocast, resolve_device
from uadct.training.data import PatchSampler, SubjectVolume, epoch_batches, load_volumes


def atlas_volume(spec: PatchSpec, tissue: bool) -> list[SubjectVolume]:
    from uadct.atlas import load_atlas
    from uadct.preprocess.intensity import normalize_intensity

    atlas = load_atlas()
    mask = sitk.GetArrayFromImage(atlas.mask).astype(np.float32)
    image, _ = normalize_intensity(sitk.GetArrayFromImage(atlas.brain), mask)
    model = fit_tissue_gmm(image, mask) if tissue else None
    return [SubjectVolume("sri24", image.astype(np.float32), mask, valid_training_starts(mask, spec), tissue=model)]


def sampler_rate(sampler: PatchSampler, batch_size: int, workers: int, seconds: float) -> float:
    """Patches per second delivered by ``epoch_batches`` (workers started once, as in one epoch)."""
    steps = 4
    while True:
        started = time.perf_counter()
        count = sum(len(batch[0]) for batch in epoch_batches(sampler, 0, 0, steps, batch_size, workers))
        elapsed = time.perf_counter() - started
        if elapsed >= seconds or steps >= 1 << 16:
            return count / elapsed
        steps *= 2


def rate(function, patches_per_call: int, seconds: float = 3.0) -> float:
    """Calls ``function`` for about ``seconds`` after one warm-up call; patches per second."""
    function()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        function()
        calls += 1
    return calls * patches_per_call / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prep", type=Path, default=None)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=4, help="sampling worker processes (0: in the main process)")
    parser.add_argument("--augment", default="flip", help="flip, gmm or flip,gmm")
    parser.add_argument("--amp", action="store_true", help="time training steps under bfloat16 autocast")
    options = parser.parse_args()
    spec = PatchSpec(options.patch_size, 2)
    augment = set(options.augment.split(","))
    if options.prep:
        from uadct.preprocess.prepared import find_prepared

        volumes, _ = load_volumes(find_prepared(options.prep), spec, 0.5, tissue_models="gmm" in augment)
    else:
        volumes = atlas_volume(spec, "gmm" in augment)
    device = resolve_device(options.device)
    augmenter = ContrastAugmenter().fit([v.tissue.theta for v in volumes]) if "gmm" in augment else None
    sampler = PatchSampler(volumes, spec, seed=0, flip="flip" in augment, augmenter=augmenter)
    in_process = sampler_rate(sampler, options.batch_size, 0, options.seconds)
    in_workers = sampler_rate(sampler, options.batch_size, options.workers, options.seconds) if options.workers else in_process
    print(f"device {device}, torch threads {torch.get_num_threads()}, patch {spec.size} px, batch {options.batch_size}, "
          f"augment {options.augment}, {len(volumes)} subject(s), amp {'bfloat16' if options.amp else 'off'}")
    print(f"{'sampler':<12}{in_process:>14.0f} patches/s in the training process, "
          f"{in_workers:.0f} patches/s with {options.workers} worker(s)")
    images, masks, _ = sampler.sample(options.batch_size)
    x, m = torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device)
    slowest = float("inf")
    for name in patch_models():  # voxel-wise models (normative) fit whole volumes, not patch batches
        model = build_model(name, {"patch_size": spec.size}).to(device).train()
        optimizers = model.configure_optimizers(1e-3)
        def step() -> None:
            with autocast(device, options.amp):
                model.training_step(x, m, optimizers)
            if device.type == "cuda":
                torch.cuda.synchronize()

        train_rate = rate(step, options.batch_size, options.seconds)
        model.eval()
        with torch.no_grad():
            model.fit_statistics(x, m)
            infer_rate = rate(lambda: model.score_patches(x), options.batch_size, options.seconds)
        trainable = any(p.requires_grad for p in model.parameters())
        if trainable:
            slowest = min(slowest, train_rate)
        train_text = f"{train_rate:>14.0f}" if trainable else f"{'-':>14}"
        print(f"{name:<12}{train_text} train patches/s{infer_rate:>14.0f} score patches/s"
              + ("" if trainable else "  (no trainable parameters)"))
    print(f"sampler ({options.workers} workers) / slowest training step: {in_workers / slowest:.1f}x (goal: at least 3x)")


if __name__ == "__main__":
    main()
