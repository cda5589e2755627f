"""Image-level evaluation against image labels (normal / abnormal per image), without lesion masks.

For 2D benchmarks (X-rays labelled per image, the one-class protocol) there are no lesion
masks, only a label per image. :func:`read_image_labels` reads them from

- a CSV or TSV file: a header row, the image id in the first column (a file name or path
  works: its folder and suffix are dropped) and the label in the second: ``normal``,
  ``healthy``, ``0``, ``false`` or ``abnormal``, ``anomaly``, ``anomalous``, ``1``, ``true``;
- a folder with ``normal/`` and ``abnormal/`` sub-folders: each file (or prepared subject
  folder) in them is an image of that label, by name.

:func:`evaluate_image_labels` takes each map's image score from its score sidecar (else the
mean of the top ``image_top_k`` nonzero map values), and measures what
:mod:`uadct.evaluate` measures at the image level (AUROC, the F1-optimal threshold, the
classification at the applied threshold; :func:`uadct.evaluate.image_level_metrics`) plus
AUPRC (average precision, abnormal = positive), with a percentile bootstrap interval of the
AUROC over images. It writes ``image_level.json``, ``image_scores.csv``, ``image_level.md``
and ``image_roc.png`` into the report folder.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from uadct.errors import InputError

NORMAL_WORDS = ("normal", "healthy", "0", "false", "negative")
ABNORMAL_WORDS = ("abnormal", "anomaly", "anomalous", "1", "true", "positive")
JSON_NAME, CSV_NAME, MARKDOWN_NAME, ROC_NAME = "image_level.json", "image_scores.csv", "image_level.md", "image_roc.png"


def _image_id(text: str) -> str:
    from uadct.names import strip_nifti_suffix

    return strip_nifti_suffix(Path(text.strip().replace("\\", "/")).name)


def read_image_labels(source: str | Path) -> dict[str, bool]:
    """Image id -> abnormal, from a CSV/TSV file or a folder with ``normal/`` and ``abnormal/`` sub-folders."""
    source = Path(source)
    if source.is_dir():
        labels: dict[str, bool] = {}
        for name, abnormal in (("normal", False), ("abnormal", True)):
            folder = source / name
            if not folder.is_dir():
                continue
            for item in sorted(folder.iterdir()):
                if item.name.startswith("."):
                    continue
                key = _image_id(item.name)
                if key in labels and labels[key] != abnormal:
                    raise InputError(f"{item}: image {key!r} is both normal and abnormal in {source}")
                labels[key] = abnormal
        if not labels:
            raise InputError(f"{source}: no images in normal/ or abnormal/ sub-folders (image labels by folder)")
        return labels
    if not source.is_file():
        raise InputError(f"{source}: no such image-label file or folder")
    try:
        text = source.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{source}: unreadable image-label table ({type(exc).__name__})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        raise InputError(f"{source}: expected a header row and one row per image (id, label)")
    delimiter = "\t" if source.suffix.lower() == ".tsv" or "\t" in lines[0] else ","
    labels = {}
    for number, row in enumerate(csv.reader(lines[1:], delimiter=delimiter), start=2):
        if len(row) < 2:
            raise InputError(f"{source}: line {number}: expected an image id and a label, found {row!r}")
        word = row[1].strip().lower()
        if word in NORMAL_WORDS:
            abnormal = False
        elif word in ABNORMAL_WORDS:
            abnormal = True
        else:
            raise InputError(f"{source}: line {number}: label {row[1]!r} is neither normal ({'/'.join(NORMAL_WORDS)}) "
                             f"nor abnormal ({'/'.join(ABNORMAL_WORDS)})")
        key = _image_id(row[0])
        if key in labels and labels[key] != abnormal:
            raise InputError(f"{source}: line {number}: image {key!r} is labelled both ways")
        labels[key] = abnormal
    return labels


@dataclass
class ImageLevelResult:
    """What :func:`evaluate_image_labels` measured: one row per image, the metrics, the files written."""

    per_image: list[dict[str, Any]]
    metrics: dict[str, Any]
    files: dict[str, Path]
    missing: list[str] = field(default_factory=list)  # maps without an image label (left out)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _maps_by_id(maps_dir: Path) -> dict[str, Path]:
    from uadct.images2d import list_images_2d
    from uadct.io import list_niftis

    found: dict[str, Path] = {}
    for path in list_niftis(maps_dir) or list_images_2d(maps_dir):
        key = _image_id(path.name)
        if key in found:
            raise InputError(f"{maps_dir}: two maps for {key!r} ({found[key].name}, {path.name})")
        found[key] = path
    if not found:
        raise InputError(f"{maps_dir}: no anomaly maps (NIfTI, PNG or TIFF files) found")
    return found


def map_image_score(path: Path, top_k: int) -> tuple[float, str]:
    """The image score of a map: its sidecar's, else the mean of its top ``top_k`` nonzero values."""
    import SimpleITK as sitk

    from uadct.arrays import top_k_mean
    from uadct.io import read_image
    from uadct.scoremap import ScoreSidecar

    sidecar = ScoreSidecar.read(path)
    if sidecar is not None and sidecar.image_score is not None:
        return sidecar.image_score, "sidecar"
    values = sitk.GetArrayViewFromImage(read_image(path, allow_empty=True))
    inside = values[values != 0]
    if not np.isfinite(inside).all():
        raise InputError(f"{path}: the map holds NaN or infinite values")
    return (top_k_mean(inside, top_k) if inside.size else 0.0), f"top-{top_k} mean"


def evaluate_image_labels(maps_dir: str | Path, labels_source: str | Path, out_dir: str | Path, options: Any = None,
                          progress: Callable[[int, int, str], None] | None = None) -> ImageLevelResult:
    """Image-level AUROC/AUPRC of the maps in ``maps_dir`` against image labels; report files into ``out_dir``.

    ``options``: :class:`uadct.evaluate.EvaluationOptions` (``image_top_k``, ``bootstrap``,
    ``seed``, ``confidence``, ``threshold_from``, ``plots`` apply). Maps without a label are
    left out (listed in ``missing``); a map that cannot be read is listed in ``failed``.
    """
    from uadct.evaluate import EvaluationOptions, image_level_metrics, read_validation
    from uadct.io import write_json, write_text
    from uadct.metrics import bootstrap_auroc, bootstrap_weights, percentile_interval

    options = options or EvaluationOptions()
    maps_dir, out_dir = Path(maps_dir), Path(out_dir)
    labels = read_image_labels(labels_source)
    maps = _maps_by_id(maps_dir)
    subjects = sorted(set(maps) & set(labels))
    missing = sorted(set(maps) - set(labels))
    if not subjects:
        raise InputError(f"no anomaly map in {maps_dir} has an image label in {labels_source} "
                         f"(maps: {', '.join(sorted(maps)[:5])}; labels: {', '.join(sorted(labels)[:5])})")
    rows: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    for done, subject in enumerate(subjects, start=1):
        try:
            score, source = map_image_score(maps[subject], options.image_top_k)
        except InputError as exc:
            failed.append((subject, str(exc)))
        else:
            rows.append({"image": subject, "abnormal": labels[subject], "image_score": score, "source": source,
                         "map": str(maps[subject])})
        if progress is not None:
            progress(done, len(subjects), subject)
    if not rows:
        raise InputError(f"{maps_dir}: no map could be read; first: {failed[0][1]}")
    scores = np.array([row["image_score"] for row in rows], dtype=np.float64)
    abnormal = np.array([row["abnormal"] for row in rows], dtype=bool)
    validation = read_validation(options.threshold_from) if options.threshold_from is not None else None
    metrics = image_level_metrics(scores, abnormal, validation, options)
    metrics["unit"] = "image"
    metrics["labels"] = str(labels_source)
    if options.bootstrap and abnormal.any() and (~abnormal).any():
        weights = bootstrap_weights(len(rows), options.bootstrap, options.seed)
        metrics["auroc_interval"] = list(percentile_interval(bootstrap_auroc(scores, abnormal, weights), options.confidence))
        metrics["interval_method"] = (f"percentile bootstrap over images, {options.bootstrap} resamples, seed {options.seed}, "
                                      f"{options.confidence:.0%} coverage")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    files = {"image_json": write_json({"metrics": metrics, "per_image": rows, "maps_without_label": missing,
                                       "failed": [{"image": s, "error": e} for s, e in failed], "options": settings},
                                      out_dir / JSON_NAME)}
    table = ["image,abnormal,image_score,source"] + [f"{r['image']},{int(r['abnormal'])},{r['image_score']:.6g},{r['source']}"
                                                     for r in rows]
    files["image_csv"] = write_text("\n".join(table) + "\n", out_dir / CSV_NAME)
    files["image_markdown"] = write_text(_markdown(metrics, len(rows), missing, failed), out_dir / MARKDOWN_NAME)
    if options.plots and abnormal.any() and (~abnormal).any():
        from uadct.report_curves import plot_image_roc

        files["image_roc"] = plot_image_roc(scores, abnormal, out_dir / ROC_NAME, metrics["auroc"], "image")
    return ImageLevelResult(rows, metrics, files, missing, failed)


def _markdown(metrics: dict[str, Any], n: int, missing: list[str], failed: list[tuple[str, str]]) -> str:
    def number(value: Any) -> str:
        return "n/a" if value is None or value != value else f"{value:.3f}"

    interval = metrics.get("auroc_interval")
    lines = [
        "# Image-level evaluation", "",
        f"{n} images ({metrics['n_abnormal']} abnormal, {metrics['n_normal']} normal); labels from {metrics['labels']}.", "",
        "| metric | value |", "|---|---|",
        f"| AUROC | {number(metrics['auroc'])}" + (f" ({number(interval[0])}-{number(interval[1])})" if interval else "") + " |",
        f"| AUPRC (abnormal = positive) | {number(metrics['auprc'])} |",
        f"| F1 at {number(metrics['threshold'])} ({metrics['threshold_source']}) | {number(metrics.get('f1'))} |",
        f"| sensitivity / specificity | {number(metrics.get('sensitivity'))} / {number(metrics.get('specificity'))} |",
    ]
    if missing:
        lines += ["", f"{len(missing)} map(s) without an image label, left out."]
    if failed:
        lines += ["", f"{len(failed)} map(s) could not be read: " + "; ".join(e for _, e in failed[:5])]
    return "\n".join(lines) + "\n"
