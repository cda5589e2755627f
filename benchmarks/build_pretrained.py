"""Rebuild the shipped pretrained T1 model (``uadct/pretrained/t1.pt``) from the IXI T1 scans.

    python benchmarks/build_pretrained.py ../shared/data/ixi-t1-2mm -o bench_out/pretrained
    python benchmarks/build_pretrained.py ../shared/data/ixi-t1-2mm -o bench_out/pretrained --install   # also copy into uadct/pretrained/

Steps (each cached in the output folder, so a rerun after an interruption continues):
1. The IXI scans (60 healthy adults, 2 mm, with skull) less the benchmark's held-out test
   subjects (the first 14 of ``benchmarks/realdata.py``'s fixed permutation, seed 20261129:
   its largest test set, ``--full``; the shipped model never saw any subject the real-data
   benchmark tests on).
2. Preprocessing as `uadct preprocess --atlas sri24@2mm` (deepbet skull-strip, lesion-robust
   N4 ``--bias-field robust``, affine registration with the SimpleITK backend to the 2 mm
   SRI24 brain, ``tissue`` normalisation), pinned here whatever the current defaults.
   Every thread count (OMP, torch, ITK/SimpleITK) is pinned to 1, in this process and in
   each preprocessing worker, so the arrays do not depend on the machine's core count.
3. `uadct train` with the settings below (seed 0, CPU): the model fits on 80 % of the
   subjects; the other 20 % give the healthy calibration (``--units``, ``--fpr``).
4. The checkpoint is rewritten without what differs between runs (training seconds, worker
   counts, local paths) so the same data, seed and library versions give the same bytes; its
   SHA-256 is printed and written into the model card (``t1.json``) with ``--install``. It
   keeps the training resolution (2 mm), so `uadct score` blurs finer scans to 2 mm first.

Prints the SHA-256 and the paths; nothing here is timed or asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

THREADS = 1  # every thread count, so a rebuild on any machine gives the same bytes (same library versions)
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ[_variable] = str(THREADS)  # before torch/ITK load; spawned workers inherit them

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uadct.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from uadct.io import sha256_of, write_json  # noqa: E402
from uadct.preprocess.batch import preprocess_many  # noqa: E402
from uadct.preprocess.config import PreprocessConfig  # noqa: E402
from uadct.preprocess.prepared import find_prepared  # noqa: E402
from uadct.training import TrainConfig, train_model  # noqa: E402

log = logging.getLogger("build_pretrained")

NAME = "t1"
SPLIT_SEED = 20261129  # benchmarks/realdata.py's fixed IXI split
HELD_OUT = 14  # its largest (--full) test set; the default test set is the first 12 of these
ATLAS = "sri24@2mm"
MODEL = "normative"
MODEL_OPTIONS: dict[str, Any] = {"map_smooth": 1.0}  # beat map_smooth 0 on AUPRC and best Dice in benchmarks/pretrained_eval.py
SEED = 0
SUBJECTS = 0  # training subjects (0: all 46 that are not held out)
# training metadata that differs between identical runs (clock, machine): dropped from the shipped file
VOLATILE_TRAINING_KEYS = ("seconds", "workers", "device", "processes", "amp")


def training_scans(data: Path, count: int | None = None) -> tuple[list[Path], list[Path]]:
    """(training scans: the first ``count`` after the held-out ones in the split's order, default
    all; held-out benchmark test scans), both sorted."""
    scans = sorted(data.glob("*.nii.gz"))
    if len(scans) < HELD_OUT + 5:
        raise SystemExit(f"{data}: expected the 60 IXI T1 scans, found {len(scans)}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(scans))
    held = sorted(scans[i] for i in order[:HELD_OUT])
    rest = [scans[i] for i in order[HELD_OUT:]]
    return sorted(rest[:count] if count else rest), held


def preprocess_config() -> PreprocessConfig:
    """The chain the shipped model was built with, pinned (not the current defaults, which may move on)."""
    return PreprocessConfig.from_dict({"atlas": ATLAS, "skull_strip": "deepbet", "registration": "affine",
                                       "registration_backend": "sitk", "bias_correction": True,
                                       "bias_correction_method": "robust", "normalization": "tissue",
                                       "percentiles": [5.0, 95.0], "mask_threshold": 0.5, "mask_opening_radius": 2,
                                       "resolution_mm": None})


def pin_threads(threads: int = THREADS) -> None:
    """torch and SimpleITK (and ITK, once loaded) to ``threads`` threads in this process."""
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def train_config(options: dict[str, Any] | None = None) -> TrainConfig:
    return TrainConfig(model=MODEL, seed=SEED, device="cpu", workers=0, model_options=dict(MODEL_OPTIONS if options is None else options),
                       calibration_subjects=1000)  # every validation subject calibrates


def reproducible_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata without clock/machine-dependent fields and without local paths."""
    # "resolution" (the training resolution, 2 mm) is kept: `uadct score` blurs finer scans to it first
    clean = {k: v for k, v in metadata.items() if k not in ("model", "model_config")}
    clean["training"] = {k: v for k, v in metadata.get("training", {}).items() if k not in VOLATILE_TRAINING_KEYS}
    clean["history"] = [{k: v for k, v in row.items() if "second" not in k} for row in metadata.get("history", [])]
    if ATLAS != clean.get("preprocess", {}).get("atlas"):  # a reused preparation's template file, verified identical
        from uadct.atlas import load_atlas

        clean["preprocess"] = {**clean["preprocess"], "atlas": ATLAS}
        clean["atlas"] = {"name": ATLAS, "sha256": load_atlas(ATLAS).checksum}
    clean["pretrained"] = {"name": NAME, "source": "IXI T1 (ixi-t1-2mm)", "held_out_benchmark_subjects": HELD_OUT,
                           "split_seed": SPLIT_SEED, "rebuild": "python benchmarks/build_pretrained.py DATA/ixi-t1-2mm"}
    return clean


def reusable_preparation(prepared: Path, template: Path, scans: list[Path]) -> dict[Path, Path]:
    """Scans -> folders of an existing preprocessing made with this script's chain on :data:`ATLAS`
    itself or on a template file identical to it (voxels and geometry); subjects made otherwise are skipped."""
    import SimpleITK as sitk

    from uadct.atlas import load_atlas
    from uadct.io import read_image

    atlas = load_atlas(ATLAS)
    ours, theirs = atlas.brain, read_image(template)
    same = (np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(theirs))
            and ours.GetOrigin() == theirs.GetOrigin() and ours.GetSpacing() == theirs.GetSpacing()
            and ours.GetDirection() == theirs.GetDirection())
    if not same:
        raise SystemExit(f"{template}: not the {ATLAS} template (voxels or geometry differ)")
    expected = {k: v for k, v in preprocess_config().to_dict().items() if k != "atlas"}
    template_sha = sha256_of(template)
    found: dict[Path, Path] = {}
    for scan in scans:
        folder = prepared / scan.name.split(".nii")[0]
        try:
            sidecar = json.loads((folder / "preprocess.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        config = {k: v for k, v in PreprocessConfig.from_dict(sidecar.get("config", {})).to_dict().items() if k != "atlas"}
        if (config == expected and sidecar.get("atlas", {}).get("sha256") in (template_sha, atlas.checksum)
                and sidecar.get("input", {}).get("sha256") == sha256_of(scan)):
            found[scan] = folder
    return found


def build(data: Path, out: Path, jobs: int, count: int | None = None, prepare_only: bool = False,
          prepared: Path | None = None, template: Path | None = None, model_options: dict[str, Any] | None = None) -> Path | None:
    """Preprocess, train and write ``out/t1.pt`` (reproducible bytes); its path."""
    all_scans, held = training_scans(data)
    scans, _ = training_scans(data, count)
    log.info("%d training scans, %d held out for the benchmark", len(scans), len(held))
    prep = out / "prep"  # every training scan, prepared in the split's order (the first ones first)
    folders: dict[Path, Path] = {}
    if prepared is not None:
        if template is None:
            raise SystemExit("--prepared needs --template (the template file that preprocessing used)")
        folders = reusable_preparation(prepared, template, scans)
        scans = sorted(folders)
        log.info("reusing %d prepared subjects from %s", len(folders), prepared)
    else:
        ordered = sorted(all_scans, key=lambda s: (s not in scans, all_scans.index(s)))
        outcome = preprocess_many(ordered if prepare_only else scans, prep, preprocess_config(), jobs=jobs,
                                  threads=THREADS)
        if outcome.failed:
            raise SystemExit(f"preprocessing failed: {outcome.failed}")
        folders = {scan: prep / scan.name.split(".nii")[0] for scan in scans}
    if prepare_only:
        return None
    chosen = out / f"train-{len(scans)}"  # links to the chosen prepared subjects: training sees exactly these
    chosen.mkdir(parents=True, exist_ok=True)
    for scan in scans:
        name = scan.name.split(".nii")[0]
        link = chosen / name
        if not link.exists():
            link.symlink_to(folders[scan].resolve(), target_is_directory=True)
    raw = out / "train" / f"{NAME}-{len(scans)}.pt"
    train_model(chosen, raw, train_config(model_options), resume=False)
    checkpoint = load_checkpoint(raw)
    final = out / f"{NAME}.pt"
    save_checkpoint(final, checkpoint.model, reproducible_metadata(checkpoint.metadata), checkpoint.extra_state)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the ixi-t1-2mm folder")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_out/pretrained"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="preprocessing workers (default: one per CPU, so each uses one thread)")
    parser.add_argument("--subjects", type=int, default=SUBJECTS,
                        help=f"training subjects: the first N of the split's order after the held-out ones (default {SUBJECTS}; 0: all 46)")
    parser.add_argument("--prepared", type=Path, help="reuse this folder's prepared IXI subjects (same chain; checked)")
    parser.add_argument("--template", type=Path, help="with --prepared: the template file it was registered to (must equal sri24@2mm)")
    parser.add_argument("--model-options", type=json.loads, default=None,
                        help=f"JSON of {MODEL} options to try instead of the shipped ones, e.g. '{{\"map_smooth\": 1.0}}'")
    parser.add_argument("--prepare-only", action="store_true", help="only preprocess (every training scan, in the split's order)")
    parser.add_argument("--install", action="store_true", help="copy the result into uadct/pretrained/ and update the card's SHA-256")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pin_threads()
    path = build(options.data, options.output, max(1, options.jobs), options.subjects or None, options.prepare_only,
                 options.prepared, options.template, options.model_options)
    if path is None:
        return 0
    digest = sha256_of(path)
    print(f"{path}: SHA-256 {digest} ({path.stat().st_size} bytes)")
    if options.install:
        target = REPO / "uadct" / "pretrained" / f"{NAME}.pt"
        target.write_bytes(path.read_bytes())
        card_path = target.with_suffix(".json")
        card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
        card["sha256"] = digest
        card["size_bytes"] = path.stat().st_size
        write_json(card, card_path)
        print(f"installed {target}; card {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
