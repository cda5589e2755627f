"""Fault injection: `kill -9` preprocess, train and score at random moments, rerun, compare.

For each command this script makes one uninterrupted reference run and a second
uninterrupted run (to show how deterministic the command is by itself), then ``--kills``
runs that are killed with SIGKILL at a random moment of their expected duration and
started again with the same command line. It prints, per command: faults injected,
reruns that completed, outputs identical to the reference (arrays and weights compared
exactly; maximum absolute difference otherwise), and temporary or lock files left
anywhere. Goal: everything identical, nothing left.

    UADCT_HOME=/tmp/uadct_home python benchmarks/faults.py --output /tmp/faults [--kills 4] [--seed 0]

Data: the demo cohort at 2 mm (real SRI24 anatomy) with a 2 mm template, so one round
takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]


def uadct(*args: object) -> list[str]:
    return [sys.executable, "-m", "uadct", *map(str, args)]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment())
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def killed_then_rerun(command: list[str], delay: float) -> tuple[bool, float]:
    """Start ``command``, SIGKILL it after ``delay`` s, run it again; (was it killed, rerun seconds)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment())
    try:
        process.wait(timeout=delay)
        killed = False  # it finished first
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed = True
    return killed, run(command)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".lock") or p.name == ".uadct-locks"]


def images_difference(reference: Path, other: Path, pattern: str) -> float:
    """Largest absolute voxel difference over matching images (inf when one is missing)."""
    worst = 0.0
    for path in sorted(reference.glob(pattern)):
        twin = other / path.relative_to(reference)
        if not twin.is_file():
            return float("inf")
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(twin))).astype(np.float64)
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, float(np.abs(a - b).max()) if a.size else 0.0)
    return worst


def weights_difference(reference: Path, other: Path) -> float:
    import torch

    if not other.is_file():
        return float("inf")
    a = torch.load(reference, weights_only=True)["state_dict"]
    b = torch.load(other, weights_only=True)["state_dict"]
    if a.keys() != b.keys():
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0) for k in a)


def two_mm_template(path: Path) -> Path:
    from uadct.atlas import coarse_brain_template, fetch_atlas, load_atlas
    from uadct.io import write_image

    fetch_atlas("sri24")
    write_image(coarse_brain_template(load_atlas("sri24"), 2.0), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("faults_out"))
    parser.add_argument("--kills", type=int, default=4, help="killed runs per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", default="preprocess,train,score")
    args = parser.parse_args()
    from uadct.demo import generate_cohort

    random.seed(args.seed)
    root = args.output
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    template = two_mm_template(root / "sri24_2mm.nii.gz")
    cohort = generate_cohort(root / "cohort", n_healthy=4, n_test=3, seed=args.seed, voxel_scale=2.0)
    run(uadct("preprocess", cohort.root / "healthy", "-o", root / "prep", "--atlas", template))
    train_options = ["--patch-size", "16", "--epochs", "4", "--patience", "4", "--patches-per-epoch", "4096",
                     "--validation-patches", "512", "--seed", "1"]
    run(uadct("train", root / "prep", "-o", root / "model.pt", *train_options))

    commands: dict[str, tuple[Callable[[Path], list[str]], Callable[[Path, Path], float]]] = {
        "preprocess": (lambda out: uadct("preprocess", cohort.root / "healthy", "-o", out / "prep", "--atlas", template),
                       lambda ref, other: images_difference(ref / "prep", other / "prep", "*/*.nii.gz")),
        "train": (lambda out: uadct("train", root / "prep", "-o", out / "model.pt", *train_options),
                  lambda ref, other: weights_difference(ref / "model.pt", other / "model.pt")),
        "score": (lambda out: uadct("score", root / "model.pt", cohort.root / "test", "-o", out / "maps"),
                  lambda ref, other: images_difference(ref / "maps", other / "maps", "*.nii.gz")),
    }
    rows = []
    for name in args.commands.split(","):
        command, difference = commands[name]
        reference, again = root / f"{name}-reference", root / f"{name}-again"
        seconds = run(command(reference))
        run(command(again))
        baseline = difference(reference, again)
        killed_count, completed, identical, worst, left = 0, 0, 0, 0.0, 0
        for k in range(args.kills):
            out = root / f"{name}-kill{k}"
            killed, _ = killed_then_rerun(command(out), random.uniform(0.1, 0.9) * seconds)
            killed_count += killed
            completed += 1
            diff = difference(reference, out)
            identical += diff == 0.0
            worst = max(worst, diff)
            left += len(leftovers(out))
        rows.append((name, seconds, baseline, killed_count, completed, identical, worst, left))
        print(f"{name}: done ({seconds:.0f} s per run)", flush=True)
    print()
    print("| command | s per run | uninterrupted rerun max diff | kill -9 injected | reruns completed | identical to reference | max diff | temp/lock files left |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, seconds, baseline, killed, completed, identical, worst, left in rows:
        print(f"| {name} | {seconds:.1f} | {baseline:.3g} | {killed} | {completed} | {identical}/{completed} | {worst:.3g} | {left} |")


if __name__ == "__main__":
    main()
