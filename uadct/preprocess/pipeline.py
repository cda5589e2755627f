"""The preprocessing chain for one subject, and its on-disk contract.

raw scan -> brain mask (skull-strip) -> N4 (MR) -> affine registration of the brain to
the atlas -> image and mask resampled onto the atlas grid (mask binarised at 0.5 and
opened with radius 2) -> intensity normalisation under the mask, background 0.

A prepared subject is a folder ``<out>/<id>/`` holding ``image.nii.gz`` (float32, atlas
grid), ``mask.nii.gz`` (uint8), ``atlas_to_subject.tfm`` (SimpleITK affine: atlas
points -> subject points), ``elastix_transform.txt`` and ``preprocess.json`` (input and
checksum, versions, every parameter, timings, quality figures, the native grid). The
folder is built under a temporary name and renamed into place, so it is complete or
absent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from uadct import __version__
from uadct.atlas import Atlas, load_atlas
from uadct.errors import InputError, PreprocessError, UadctError
from uadct.io import array_like, grid_image, grid_of, read_image, sha256_of, strip_nifti_suffix, write_image, write_json
from uadct.preprocess.intensity import CT_BRAIN_WINDOW_HU, correct_bias_field, normalize_intensity
from uadct.preprocess.masks import binarize_and_open, mask_volume_ml
from uadct.preprocess.register import Registration, load_affine, register_to_atlas, save_transform
from uadct.preprocess.skullstrip import extract_brain_mask

log = logging.getLogger(__name__)

SIDECAR = "preprocess.json"
MIN_BRAIN_ML = 200.0  # an adult brain is ~1200 ml; far less means skull-stripping failed
POOR_REGISTRATION_DICE = 0.8


# per-modality defaults of the fields that differ (see PreprocessConfig.for_modality)
MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mr": {"skull_strip": "deepbet", "bias_correction": True, "normalization": "percentile"},
    "ct": {"skull_strip": "ct", "bias_correction": False, "normalization": "ct-window"},
}


@dataclass
class PreprocessConfig:
    """Every parameter of the chain (stored in sidecars and checkpoints)."""

    atlas: str = "sri24"
    skull_strip: str = "deepbet"
    registration: str = "affine"
    bias_correction: bool = True
    normalization: str = "percentile"
    percentiles: tuple[float, float] = (5.0, 95.0)
    ct_window: tuple[float, float] = CT_BRAIN_WINDOW_HU  # (level, width) in HU, for normalization="ct-window"
    mask_threshold: float = 0.5
    mask_opening_radius: int = 2

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["percentiles"] = list(self.percentiles)
        data["ct_window"] = list(self.ct_window)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("percentiles", "ct_window"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def for_modality(cls, modality: str, **overrides: Any) -> "PreprocessConfig":
        """Defaults for ``mr`` (deepbet, N4, percentile) or ``ct`` (HU thresholds, no N4, brain window).

        ``overrides`` that are not None replace the modality's defaults.
        """
        if modality not in MODALITY_DEFAULTS:
            raise InputError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITY_DEFAULTS)}")
        values = dict(MODALITY_DEFAULTS[modality])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class PreprocessedSubject:
    """One subject on the atlas grid, with what is needed to go back to its own grid."""

    image: sitk.Image  # float32, normalised, background 0
    mask: sitk.Image  # uint8 brain mask on the atlas grid
    atlas_to_subject: sitk.AffineTransform
    native_grid: dict[str, Any]
    parameter_text: str = ""
    normalization_stats: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)


def run_preprocessing(
    image: sitk.Image,
    config: PreprocessConfig,
    atlas: Atlas,
    mask_path: str | Path | None = None,
) -> PreprocessedSubject:
    """Run the whole chain on a scan held in memory."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    native_mask = extract_brain_mask(image, config.skull_strip, mask_path)
    lap("skull_strip")
    brain_ml = mask_volume_ml(native_mask)
    if brain_ml < MIN_BRAIN_ML and config.skull_strip != "none":
        raise PreprocessError(f"the brain mask is tiny ({brain_ml:.0f} ml): skull-stripping failed")
    if brain_ml <= 0:
        raise PreprocessError("the brain mask is empty")
    if config.bias_correction:
        image = correct_bias_field(image, native_mask)
        lap("bias_correction")
    brain = sitk.Mask(image, native_mask)
    registration: Registration = register_to_atlas(brain, atlas.brain, config.registration)
    lap("registration")
    transform = registration.atlas_to_subject
    warped = sitk.Resample(brain, atlas.brain, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped_mask = sitk.Resample(sitk.Cast(native_mask, sitk.sitkFloat32), atlas.brain, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = binarize_and_open(warped_mask, config.mask_threshold, config.mask_opening_radius)
    lap("resample")
    mask_array = sitk.GetArrayViewFromImage(mask)
    if not mask_array.any():
        raise PreprocessError("the brain mask is empty after registration (registration diverged?)")
    normalized, stats = normalize_intensity(sitk.GetArrayFromImage(warped), mask_array, config.normalization,
                                            config.percentiles, config.ct_window)
    lap("normalization")
    quality = registration_quality(normalized, mask_array, atlas)
    if quality["mask_dice"] < POOR_REGISTRATION_DICE:
        log.warning("poor registration: Dice of the warped mask with the atlas mask is %.2f", quality["mask_dice"])
    return PreprocessedSubject(
        image=array_like(normalized, atlas.brain),
        mask=mask,
        atlas_to_subject=transform,
        native_grid=grid_of(image),
        parameter_text=registration.parameter_text,
        normalization_stats=stats,
        timings=timings,
        quality=quality,
    )


def registration_quality(normalized: np.ndarray, mask: np.ndarray, atlas: Atlas) -> dict[str, float]:
    """Dice of the warped brain mask with the atlas mask, and NCC with the atlas inside it."""
    atlas_mask = sitk.GetArrayViewFromImage(atlas.mask) > 0
    subject_mask = mask > 0
    overlap = np.count_nonzero(atlas_mask & subject_mask)
    dice = 2.0 * overlap / max(1, np.count_nonzero(atlas_mask) + np.count_nonzero(subject_mask))
    both = atlas_mask & subject_mask
    a = sitk.GetArrayViewFromImage(atlas.brain)[both].astype(np.float64)
    b = normalized[both].astype(np.float64)
    ncc = float(np.corrcoef(a, b)[0, 1]) if a.size > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    return {"mask_dice": round(float(dice), 4), "ncc": round(ncc, 4)}


def library_versions() -> dict[str, str]:
    """Versions of uadct and the libraries whose behaviour shapes the outputs."""
    import importlib.metadata as metadata

    versions = {"uadct": __version__}
    for package in ("torch", "SimpleITK", "itk-elastix", "deepbet", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def subject_id(path: str | Path) -> str:
    """Subject id from a scan's file name (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``)."""
    return strip_nifti_suffix(path)


def is_complete(subject_dir: Path, config: PreprocessConfig, input_sha256: str | None = None) -> bool:
    """True when a prepared folder is complete and was made with the same parameters."""
    sidecar = subject_dir / SIDECAR
    if not sidecar.is_file():
        return False
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if data.get("config") != config.to_dict():
        return False
    if input_sha256 is not None and data.get("input", {}).get("sha256") != input_sha256:
        return False
    return all((subject_dir / name).is_file() for name in ("image.nii.gz", "mask.nii.gz", "atlas_to_subject.tfm"))


def preprocess_file(
    path: str | Path,
    out_dir: str | Path,
    config: PreprocessConfig | None = None,
    atlas: Atlas | None = None,
    force: bool = False,
    mask_path: str | Path | None = None,
) -> tuple[Path, bool]:
    """Preprocess one scan into ``out_dir/<id>/``; returns (folder, was_skipped)."""
    config = config or PreprocessConfig()
    path = Path(path)
    out_dir = Path(out_dir)
    subject_dir = out_dir / subject_id(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    checksum = sha256_of(path)
    if not force and is_complete(subject_dir, config, checksum):
        return subject_dir, True
    image = read_image(path)
    atlas = atlas or load_atlas(config.atlas)
    try:
        result = run_preprocessing(image, config, atlas, mask_path)
    except UadctError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    sidecar = {
        "format": "uadct-preprocess/1",
        "subject": subject_id(path),
        "input": {"path": str(path.resolve()), "sha256": checksum},
        "versions": library_versions(),
        "config": config.to_dict(),
        "atlas": {"name": atlas.name, "sha256": atlas.checksum},
        "native_grid": result.native_grid,
        "normalization_stats": result.normalization_stats,
        "timings_s": result.timings,
        "quality": result.quality,
    }
    write_prepared(result, sidecar, subject_dir)
    return subject_dir, False


def write_prepared(result: PreprocessedSubject, sidecar: dict[str, Any], subject_dir: Path) -> None:
    """Write a prepared subject folder atomically (build under a temporary name, then rename)."""
    subject_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{subject_dir.name}.", suffix=".tmp", dir=subject_dir.parent))
    try:
        write_image(result.image, staging / "image.nii.gz")
        write_image(result.mask, staging / "mask.nii.gz")
        save_transform(result.atlas_to_subject, staging / "atlas_to_subject.tfm")
        (staging / "elastix_transform.txt").write_text(result.parameter_text)
        write_json(sidecar, staging / SIDECAR)
        if subject_dir.exists():
            shutil.rmtree(subject_dir)
        staging.rename(subject_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass
class PreparedSubject:
    """A prepared subject read back from disk."""

    subject: str
    image: sitk.Image
    mask: sitk.Image
    atlas_to_subject: sitk.AffineTransform
    sidecar: dict[str, Any]

    @property
    def native_reference(self) -> sitk.Image:
        """An empty image on the subject's own grid (for resampling maps back)."""
        return grid_image(self.sidecar["native_grid"])


def load_prepared(subject_dir: str | Path) -> PreparedSubject:
    """Read a folder written by :func:`preprocess_file`."""
    subject_dir = Path(subject_dir)
    sidecar_path = subject_dir / SIDECAR
    if not sidecar_path.is_file():
        raise InputError(f"{subject_dir}: not a prepared subject folder (no {SIDECAR}); run `uadct preprocess` first")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{sidecar_path}: corrupt JSON") from None
    image = read_image(subject_dir / "image.nii.gz")
    mask = read_image(subject_dir / "mask.nii.gz", allow_empty=True)
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    transform = load_affine(subject_dir / "atlas_to_subject.tfm")
    return PreparedSubject(sidecar.get("subject", subject_dir.name), image, mask, transform, sidecar)


def find_prepared(prep_dir: str | Path) -> list[Path]:
    """Prepared subject folders directly inside ``prep_dir``, sorted."""
    prep_dir = Path(prep_dir)
    if not prep_dir.is_dir():
        raise InputError(f"{prep_dir}: not a folder")
    return sorted(p for p in prep_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / SIDECAR).is_file())


@dataclass
class BatchOutcome:
    """What happened to each input of a batch."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def preprocess_many(
    paths: list[Path],
    out_dir: str | Path,
    config: PreprocessConfig | None = None,
    force: bool = False,
    progress: Callable[[Path, str], None] | None = None,
    jobs: int = 1,
) -> BatchOutcome:
    """Preprocess many scans; a failing subject is recorded and the batch carries on.

    ``jobs`` > 1 runs subjects in that many worker processes (``spawn`` start method, so
    safe with torch and ITK threads); each worker loads the atlas once and uses
    ``cpu_count // jobs`` threads. Outputs do not depend on ``jobs``; ``outcome`` lists
    keep the input order and ``progress`` is called as each subject finishes.
    """
    config = config or PreprocessConfig()
    if jobs < 1:
        raise InputError(f"jobs must be at least 1, got {jobs}")
    outcome = BatchOutcome()
    results: dict[int, tuple[str, Path | str]] = {}

    def record(index: int, status: str, value: Path | str) -> None:
        results[index] = (status, value)
        if progress is not None:
            progress(Path(paths[index]), status)

    atlas = load_atlas(config.atlas)  # fails early, for any number of jobs, when the atlas is missing
    jobs = min(jobs, len(paths))
    if jobs <= 1:
        for index, path in enumerate(paths):
            record(index, *_preprocess_one(path, out_dir, config, atlas, force))
    else:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        del atlas  # each worker loads its own
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(config.atlas, threads)) as pool:
            futures = {pool.submit(_worker_preprocess, path, out_dir, config, force): index
                       for index, path in enumerate(paths)}
            for future in as_completed(futures):
                record(futures[future], *future.result())
    for index, path in enumerate(paths):
        status, value = results[index]
        if status == "failed":
            outcome.failed.append((Path(path), str(value)))
        else:
            (outcome.skipped if status == "skipped" else outcome.done).append(Path(value))
    return outcome


def _preprocess_one(path: Path, out_dir: str | Path, config: PreprocessConfig, atlas: Atlas | None,
                    force: bool) -> tuple[str, Path | str]:
    """(status, folder or error message) of one subject; UadctErrors become ``failed``."""
    try:
        folder, skipped = preprocess_file(path, out_dir, config, atlas, force)
    except UadctError as exc:
        return "failed", str(exc)
    return ("skipped" if skipped else "done"), folder


_worker_atlas: dict[str, Atlas] = {}


def _init_worker(atlas_name: str, threads: int) -> None:
    """Worker set-up: thread counts (torch, ITK) and the atlas, loaded once per process."""
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        import itk

        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    except (ImportError, AttributeError):
        pass
    _worker_atlas[atlas_name] = load_atlas(atlas_name)


def _worker_preprocess(path: Path, out_dir: str | Path, config: PreprocessConfig, force: bool) -> tuple[str, Path | str]:
    return _preprocess_one(path, out_dir, config, _worker_atlas.get(config.atlas), force)
