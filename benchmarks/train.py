"""Patches per second of the patch sampler alone and of one training step per model.

    python benchmarks/train.py [--prep demo_out/prep] [--patch-size 16] [--batch-size 128]

Uses prepared subjects when given (e.g. the demo's), else the SRI24 brain itself as a
prepared volume. The sampler should be at least 3x faster than the slowest training
step, so that a GPU is never starved by data preparation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from uadct.models import available_models, build_model
from uadct.patches import PatchSpec, valid_training_positions
from uadct.train import PatchSampler, SubjectVolume, load_volumes, resolve_device


def atlas_volume(spec: PatchSpec) -> list[SubjectVolume]:
    from uadct.atlas import load_atlas
    from uadct.preprocess.intensity import normalize_intensity

    atlas = load_atlas()
    mask = sitk.GetArrayFromImage(atlas.mask).astype(np.float32)
    image, _ = normalize_intensity(sitk.GetArrayFromImage(atlas.brain), mask)
    return [SubjectVolume("sri24", image, mask, valid_training_positions(mask, spec))]


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
    options = parser.parse_args()
    spec = PatchSpec(options.patch_size, 2)
    if options.prep:
        from uadct.preprocess.pipeline import find_prepared

        volumes, _ = load_volumes(find_prepared(options.prep), spec, 0.5)
    else:
        volumes = atlas_volume(spec)
    device = resolve_device(options.device)
    sampler = PatchSampler(volumes, spec, seed=0, flip=True)
    sampler_rate = rate(lambda: sampler.sample(options.batch_size), options.batch_size, options.seconds)
    print(f"device {device}, torch threads {torch.get_num_threads()}, patch {spec.size} px, batch {options.batch_size}")
    print(f"{'sampler':<12}{sampler_rate:>14.0f} patches/s")
    images, masks = sampler.sample(options.batch_size)
    x, m = torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device)
    slowest = float("inf")
    for name in available_models():
        model = build_model(name, {"patch_size": spec.size}).to(device).train()
        optimizers = model.configure_optimizers(1e-3)
        train_rate = rate(lambda: model.training_step(x, m, optimizers), options.batch_size, options.seconds)
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
    print(f"sampler / slowest training step: {sampler_rate / slowest:.1f}x (goal: at least 3x)")


if __name__ == "__main__":
    main()
