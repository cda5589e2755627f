"""Per-step preprocessing seconds, read from the sidecars of a prepared folder.

    python benchmarks/preprocess_steps.py demo_out/prep

Prints one row per subject and the mean of each step (skull-strip, N4, registration,
resampling, normalisation) as recorded by `uadct preprocess` in preprocess.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from uadct.preprocess.prepared import PreparedFolder, find_prepared


def main(prep_dir: str) -> None:
    if not Path(prep_dir).is_dir():
        sys.exit(f"{prep_dir}: not a folder of prepared subjects (give the output folder of `uadct preprocess`)")
    folders = [PreparedFolder(path) for path in find_prepared(prep_dir)]  # plain or BIDS derivative layout
    if not folders:
        sys.exit(f"{prep_dir}: no preprocess.json found")
    rows = [(folder.name, folder.sidecar) for folder in folders]
    steps = list(rows[0][1]["timings_s"])
    print("subject".ljust(14) + "".join(s[:14].rjust(16) for s in steps) + "total".rjust(10) + "mask Dice".rjust(11))
    for name, data in rows:
        timings = data["timings_s"]
        print(name.ljust(14) + "".join(f"{timings.get(s, float('nan')):16.2f}" for s in steps)
              + f"{sum(timings.values()):10.2f}" + f"{data['quality']['mask_dice']:11.3f}")
    means = {s: float(np.mean([d["timings_s"].get(s, np.nan) for _, d in rows])) for s in steps}
    print("mean".ljust(14) + "".join(f"{means[s]:16.2f}" for s in steps) + f"{sum(means.values()):10.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_out/prep")
