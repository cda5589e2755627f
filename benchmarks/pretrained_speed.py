"""Seconds and peak memory of `uadct score t1 <raw 1 mm head T1>` (preprocessing included).

    python benchmarks/pretrained_speed.py                       # a generated 1 mm head T1 (the SRI24 head, demo cohort)
    python benchmarks/pretrained_speed.py scan.nii.gz --runs 3  # your own raw head T1
    python benchmarks/pretrained_speed.py --threads 2           # limit torch/ITK threads (the 2-core figure)

Runs the command line in a fresh process (so import time counts, as it does for a user),
``--runs`` times, and prints wall seconds, the sidecar's preprocess/score/resample split
the CPU seconds of the process (user + sys over all its threads: on a busy shared machine the wall
time mostly measures the others; CPU / 2 is a floor for the wall time on 2 idle cores) and the peak
resident memory of the process (ru_maxrss of the child). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def generated_head(folder: Path) -> Path:
    """A raw 1 mm head T1 (skull, background, bias field: the demo cohort's first healthy subject)."""
    sys.path.insert(0, str(REPO))
    from uadct.demo import generate_cohort

    cohort = generate_cohort(folder / "cohort", n_healthy=1, n_test=0, seed=0, voxel_scale=1.0)
    return Path(cohort.healthy[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", type=Path, nargs="?", help="raw head T1 (default: a generated 1 mm head)")
    parser.add_argument("--model", default="t1", help="pretrained name or checkpoint")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP/torch/ITK threads (default: all cores)")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scan = options.scan or generated_head(work)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if options.threads:
            env.update(OMP_NUM_THREADS=str(options.threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(options.threads))
        print(f"scan: {scan}; model: {options.model}; cpus: {os.cpu_count()}; threads: {options.threads or 'all'}; device: {options.device}")
        for run in range(options.runs):
            out = work / f"map{run}.nii.gz"
            command = [sys.executable, "-m", "uadct", "score", options.model, str(scan), "-o", str(out), "--fpr", "0.01",
                       "--mask-out", str(work / f"lesions{run}.nii.gz"), "--device", options.device, "--force"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:])
                return 1
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: kB; max over children so far
            timings = json.loads(out.with_name(f"map{run}.json").read_text(encoding="utf-8"))["timings_s"]
            load = os.getloadavg()[0]
            print(f"run {run}: {seconds:.1f} s wall, {cpu:.1f} s CPU (user+sys, all threads; load average {load:.1f}) (preprocess {timings.get('preprocess')} s, score {timings.get('score')} s, "
                  f"resample {timings.get('resample')} s); peak RSS {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
