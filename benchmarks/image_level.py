"""Image-level one-class benchmark on scikit-learn's bundled digits (the progressive GANomaly protocol).

    python benchmarks/image_level.py --output bench_out/image_level                  # small CPU settings
    python benchmarks/image_level.py --models threshold,cae --seeds 0 --output ...   # a subset

Protocol (Madzia-Madzou & Kuijf 2022, the Fashion-MNIST experiment; Akcay et al.'s GANomaly
one-class protocol): for each class c of a labelled image set, train on class c's training
images only, score the test images of all classes, and measure the image-level AUROC with c
as normal and the other classes as anomalous; report it per class and as the mean over the
classes. Fashion-MNIST needs a download, so scikit-learn's bundled 8 x 8 digits
(``sklearn.datasets.load_digits``, 1797 images, 10 classes, offline) stand in for it.

The images go through uadct's real 2D path: each 8 x 8 digit (values 0-16) is written as an
8-bit PNG (x 15), read by :mod:`uadct.images2d`, prepared by the library call behind
``uadct preprocess --modality image --image-size 16`` (upsampled to 16 x 16, 1st/99th
percentile -> 0/1 over the whole image), trained with :func:`uadct.training.train_model`
on the class's prepared folders with one 16 x 16 patch per image (``--patch-size 16``: the
patch is the image), and scored by :class:`uadct.inference.Inferer` on every prepared test
image (patch models score the test images stacked as one ``(N, 16, 16)`` volume, which gives each
image its own map since depth-1 patches never span two images), the image score being
:func:`uadct.inference.image_level_score` (the mean of the top 1 % of the map's pixels), as
``uadct score`` writes it to the sidecar. For each model, the first ``--cross-check`` test
images are also scored from their raw PNGs through ``score_many`` (maps and sidecars on disk)
and measured by ``uadct evaluate --image-labels`` (:mod:`uadct.image_labels`); the largest
image-score difference and both AUROCs are reported (they must agree).

Split: a stratified 75/25 train/test split of each class (``--split-seed``, fixed across
model seeds), so each one-class model sees ~135 training images and the test set holds ~450
images, ~45 normal. Models: ``threshold`` (no learning: the map is the normalised intensity,
deviation mode) and ``normative`` (pixel-wise median/MAD of the training class) as baselines,
and the registry's CAE, VAE, GANomaly and DAE with small CPU settings (see ``--epochs``,
``--patches-per-epoch``). Seeds run in turn over all models (every model's first seed comes
first). Each (model, seed) row gives the mean over classes; the spread is the standard deviation
of that mean over seeds. Outputs: ``image_level.json`` and
``image_level.md`` in ``--output`` (and the work folder with PNGs, prepared images and
checkpoints; ``--fresh`` deletes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from uadct.inference import Inferer, image_level_score, score_many
from uadct.io import write_json, write_text
from uadct.metrics import auroc
from uadct.preprocess.batch import preprocess_many
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.prepared import load_prepared
from uadct.training import TrainConfig, train_model

DEFAULT_MODELS = ("threshold", "normative", "cae", "vae", "ganomaly", "dae")
MODEL_OPTIONS: dict[str, dict[str, Any]] = {"threshold": {"mode": "deviation"}}
IMAGE_SIZE = 16  # pixels per side after preprocessing (the 8 x 8 digits upsampled); --image-size
PNG_SCALE = 15  # digit values 0-16 -> 0-240


def write_digits(folder: Path, split_seed: int, test_fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The digits as PNGs in ``folder``; returns (train, test) records ``{"id", "label", "path"}``."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    ids = np.arange(len(digits.target))
    train_ids, test_ids = train_test_split(ids, test_size=test_fraction, stratify=digits.target, random_state=split_seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = {}
    for index in ids:
        path = folder / f"digit{index:04d}.png"
        if not path.is_file():
            Image.fromarray((digits.images[index] * PNG_SCALE).astype(np.uint8)).save(path)
        records[int(index)] = {"id": path.stem, "label": int(digits.target[index]), "path": path}
    return [records[int(i)] for i in sorted(train_ids)], [records[int(i)] for i in sorted(test_ids)]


def prepare(records: list[dict[str, Any]], prep: Path, size: int) -> None:
    """``uadct preprocess --modality image --image-size SIZE`` on every PNG (skips what is done)."""
    config = PreprocessConfig.for_modality("image", image_size=(size, size))
    outcome = preprocess_many([r["path"] for r in records], prep, config)
    failed = [(str(path), error) for path, error in outcome.failed]
    if failed:
        raise SystemExit(f"preprocessing failed: {failed[:3]}")


def class_folder(prep: Path, train: list[dict[str, Any]], label: int) -> Path:
    """A folder of links to class ``label``'s prepared training images (what ``uadct train`` takes)."""
    folder = prep.parent / f"{prep.name}-classes" / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    for record in train:
        link = folder / record["id"]
        if record["label"] == label and not link.exists():
            link.symlink_to((prep / record["id"]).resolve(), target_is_directory=True)
    return folder


def test_arrays(prep: Path, test: list[dict[str, Any]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, masks = [], []
    for record in test:
        prepared = load_prepared(prep / record["id"])
        images.append(sitk.GetArrayFromImage(prepared.image))
        masks.append(sitk.GetArrayFromImage(prepared.mask))
    return images, masks


def train_config(model: str, seed: int, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(model=model, patch_size=args.image_size, dims=2, batch_size=args.batch_size, learning_rate=1e-3,
                       max_epochs=args.epochs, patience=args.epochs, patches_per_epoch=args.patches_per_epoch,
                       validation_patches=256, seed=seed, device="cpu", augment=(), workers=0, amp=False,
                       model_options={**MODEL_OPTIONS.get(model, {}), **json.loads(args.model_options).get(model, {})},
                       calibration_subjects=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.output / "work"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, test = write_digits(work / "png", args.split_seed, args.test_fraction)
    prep = work / f"prep{args.image_size}"
    prepare(train + test, prep, args.image_size)
    prepare_seconds = time.perf_counter() - started
    images, masks = test_arrays(prep, test)
    labels = np.array([r["label"] for r in test])
    classes = sorted(set(int(label) for label in labels))
    rows: list[dict[str, Any]] = []
    cross_check: dict[str, Any] = {}
    for seed in args.seeds:  # every model's first seed before any second seed: a long run reports all models early
        for model in args.models:
            per_class: dict[int, float] = {}
            seconds = {"train": 0.0, "score": 0.0}
            for label in classes:
                checkpoint = work / f"models{args.image_size}" / f"{model}_seed{seed}_class{label}.pt"
                clock = time.perf_counter()
                if not checkpoint.is_file():
                    checkpoint.parent.mkdir(parents=True, exist_ok=True)
                    train_model(class_folder(prep, train, label), checkpoint, train_config(model, seed, args), resume=False)
                seconds["train"] += time.perf_counter() - clock
                clock = time.perf_counter()
                inferer = Inferer(checkpoint, stride=4, device="cpu")
                scores = image_scores(inferer, images, masks)
                seconds["score"] += time.perf_counter() - clock
                per_class[label] = auroc(scores, labels != label)  # the other classes are the anomalies
                if model not in cross_check and args.cross_check:
                    cross_check[model] = through_files(inferer, test[: args.cross_check], work, scores[: args.cross_check])
                print(f"{model} seed {seed} class {label}: AUROC {per_class[label]:.3f}", flush=True)
            rows.append({"model": model, "seed": seed, "per_class": per_class,
                         "mean_auroc": float(np.mean(list(per_class.values()))),
                         "train_seconds": round(seconds["train"], 1), "score_seconds": round(seconds["score"], 1)})
            result = {"rows": rows, "cross_check": cross_check, "prepare_seconds": round(prepare_seconds, 1),
                      "n_train": len(train), "n_test": len(test), "classes": classes}
            write_results(result, args, time.perf_counter() - started)  # after every row: a long run reports as it goes
    return result


def write_results(result: dict[str, Any], args: argparse.Namespace, seconds: float) -> str:
    """``image_level.json`` and ``image_level.md`` in ``--output``; returns the Markdown."""
    record = {**result, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "seconds": round(seconds, 1), "platform": platform.platform(), "torch": torch.__version__,
              "python": sys.version.split()[0]}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(record, args.output / "image_level.json")
    text = markdown(result, args)
    write_text(text, args.output / "image_level.md")
    return text


def image_scores(inferer: Inferer, images: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """Image scores of the prepared test images ``(1, H, W)``, as ``uadct score`` computes them.

    Patch models score the images stacked as one ``(N, H, W)`` volume in one call (depth-1
    patches never span two images, so each slice's map is the image's own map); a model that
    maps whole volumes (``normative``) scores them one by one.
    """
    if hasattr(inferer.model, "score_volume"):
        return np.array([image_level_score(inferer(image, mask), mask) for image, mask in zip(images, masks)])
    stacked = inferer(np.concatenate(images), np.concatenate(masks))
    return np.array([image_level_score(stacked[i : i + 1], mask) for i, mask in enumerate(masks)])


def through_files(inferer: Inferer, test: list[dict[str, Any]], work: Path, in_memory: np.ndarray) -> dict[str, Any]:
    """The first test images' raw PNGs through ``score_many`` (maps + sidecars) and ``evaluate --image-labels``,
    against the in-memory scores: the largest image-score difference and both AUROCs (first class as normal)."""
    from uadct.evaluate import EvaluationOptions
    from uadct.image_labels import evaluate_image_labels

    maps = work / "check_maps"
    if maps.exists():
        shutil.rmtree(maps)
    outcome = score_many(inferer, [r["path"] for r in test], maps, force=True)
    normal = test[0]["label"]
    table = work / "check_labels.csv"
    table.write_text("image,label\n" + "".join(f"{r['id']},{int(r['label'] != normal)}\n" for r in test), encoding="utf-8")
    result = evaluate_image_labels(maps, table, work / "check_report", EvaluationOptions(bootstrap=0, plots=False))
    by_id = {row["image"]: row["image_score"] for row in result.per_image}
    files = np.array([by_id[r["id"]] for r in test])
    check = {"model": inferer.checkpoint.model_name, "images": len(test), "normal_class": normal,
             "max_abs_score_difference": float(np.abs(files - in_memory).max()),
             "auroc_in_memory": auroc(in_memory, np.array([r["label"] != normal for r in test])),
             "auroc_through_files": result.metrics["auroc"], "failed": len(outcome.failed)}
    print(f"cross-check {check['model']} ({len(test)} raw PNGs -> score_many -> evaluate --image-labels): AUROC "
          f"{check['auroc_through_files']:.4f} vs {check['auroc_in_memory']:.4f} in memory, largest image-score "
          f"difference {check['max_abs_score_difference']:.2e}", flush=True)
    return check


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    rows = result["rows"]
    classes = result["classes"]
    lines = [f"Digits one-class protocol, {result['n_train']} train / {result['n_test']} test images, "
             f"{args.image_size} x {args.image_size}, seeds {', '.join(map(str, args.seeds))}; AUROC per class (mean over seeds) and "
             "the mean over classes (+- SD over seeds).", "",
             "| model | " + " | ".join(str(c) for c in classes) + " | mean | train s | score s |",
             "|---|" + "---|" * (len(classes) + 3)]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        means = np.array([r["mean_auroc"] for r in mine])
        spread = f" +- {means.std(ddof=1):.3f}" if len(means) > 1 else ""
        cells = [f"{np.mean([r['per_class'][c] for r in mine]):.3f}" for c in classes]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | **{means.mean():.3f}**{spread} | "
                     f"{np.mean([r['train_seconds'] for r in mine]):.0f} | {np.mean([r['score_seconds'] for r in mine]):.0f} |")
    for check in result["cross_check"].values():
        lines += ["", f"Cross-check {check['model']}: the first {check['images']} test PNGs through `score_many` + "
                      f"`evaluate --image-labels`: AUROC {check['auroc_through_files']:.4f} vs {check['auroc_in_memory']:.4f} in "
                      f"memory, largest image-score difference {check['max_abs_score_difference']:.1e}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--patches-per-epoch", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cross-check", type=int, default=40, help="test images also scored through files per model (0: none)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--model-options", default="{}", help='JSON {"model": {"field": value}} for the models\' configs')
    args = parser.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    logging.basicConfig(level=logging.WARNING)
    clock = time.perf_counter()
    result = run(args)
    print(write_results(result, args, time.perf_counter() - clock))


if __name__ == "__main__":
    main()
