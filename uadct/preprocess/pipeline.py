"""The preprocessing chain for one subject, and its on-disk contract.

raw scan -> brain mask (skull-strip) -> N4 (MR) -> affine registration of the brain to
the atlas -> image and mask resampled onto the atlas grid (mask binarised at 0.5 and
opened with radius 2) -> intensity normalisation under the mask, background 0. With
several sequences, the reference is skull-stripped and registered; the others are
resampled onto its grid (scanner coordinates), share its mask and transform, and get
their own N4 and normalisation.

A prepared subject is a folder ``<out>/<id>/`` holding ``image.nii.gz`` (float32, atlas
grid; the reference sequence), ``image-<sequence>.nii.gz`` for other sequences,
``mask.nii.gz`` (uint8), ``atlas_to_subject.tfm`` (SimpleITK affine: atlas points ->
subject points, what resampling onto the atlas grid uses), ``subject_to_atlas.tfm`` (its
inverse: subject points -> atlas points), ``elastix_transform.txt`` and
``preprocess.json`` (inputs and checksums, versions, every parameter, timings, quality
figures, warnings, the native grid, and the file names above under ``files``). BIDS
inputs get BIDS derivative names instead (see :mod:`uadct.preprocess.bids`). The folder
is built under a temporary name and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import dataclasses
import os
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
from uadct.dicom import is_dicom_folder
from uadct.errors import InputError, PreprocessError, UadctError
from uadct.locks import output_lock, remove_stale_temporaries
from uadct.outputs import folder_mode, write_failure
from uadct.io import (array_like, grid_image, grid_of, read_image, same_grid, sha256_of, strip_nifti_suffix, write_image,
                      write_json)
from uadct.preprocess.bids import SINGLE, SubjectInputs, bids_file_names, write_derivative_description
from uadct.preprocess.intensity import CT_BRAIN_WINDOW_HU, correct_bias_field, normalize_intensity
from uadct.preprocess.masks import binarize_and_open, mask_volume_ml
from uadct.preprocess.register import Registration, load_affine, register_to_atlas, save_transform
from uadct.preprocess.resolution import effective_voxel_mm, harmonize_resolution, voxel_size_mm
from uadct.preprocess.skullstrip import extract_brain_mask

log = logging.getLogger(__name__)

SIDECAR = "preprocess.json"
MIN_BRAIN_ML = 200.0  # an adult brain is ~1200 ml; far less means skull-stripping failed
POOR_REGISTRATION_DICE = 0.8  # below: a warning in the sidecar and the summary
FAILED_REGISTRATION_DICE = 0.5  # below: the subject fails (registration diverged)
SCALE_RANGE = (0.5, 2.0)  # singular values of the atlas->subject matrix outside: diverged


LEGACY_BIAS_CORRECTION = "n4"  # what configs recorded without bias_correction_method ran
BIAS_CORRECTIONS = ("robust", "n4")

# per-modality defaults of the fields that differ (see PreprocessConfig.for_modality)
MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mr": {"skull_strip": "deepbet", "bias_correction": True, "bias_correction_method": "robust", "normalization": "tissue"},
    "ct": {"skull_strip": "ct", "bias_correction": False, "normalization": "ct-window"},
}


@dataclass
class PreprocessConfig:
    """Every parameter of the chain (stored in sidecars and checkpoints)."""

    atlas: str = "sri24"
    skull_strip: str = "deepbet"
    registration: str = "affine"
    bias_correction: bool = True
    bias_correction_method: str = "robust"  # "robust": N4 fitted on normal tissue only (uadct.preprocess.tissue); "n4": whole mask
    normalization: str = "tissue"  # normal-tissue median -> 0.5, 4 robust SDs -> 1 (lesion-robust); "percentile" before
    percentiles: tuple[float, float] = (5.0, 95.0)
    ct_window: tuple[float, float] = CT_BRAIN_WINDOW_HU  # (level, width) in HU, for normalization="ct-window"
    mask_threshold: float = 0.5
    mask_opening_radius: int = 2
    sequences: tuple[str, ...] = ()  # e.g. ("T1w", "FLAIR"); empty: one scan per subject
    reference: str = ""  # the sequence that is skull-stripped and registered (default: the first)
    resolution_mm: float | None = None  # blur finer scans to this effective resolution first (uadct.preprocess.resolution)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["percentiles"] = list(self.percentiles)
        data["ct_window"] = list(self.ct_window)
        data["sequences"] = list(self.sequences)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("bias_correction_method", LEGACY_BIAS_CORRECTION)  # recorded before the field existed
        for name in ("percentiles", "ct_window", "sequences"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def for_modality(cls, modality: str, **overrides: Any) -> "PreprocessConfig":
        """Defaults for ``mr`` (deepbet, robust N4, tissue normalisation) or ``ct`` (HU thresholds, no N4, brain window).

        ``overrides`` that are not None replace the modality's defaults.
        """
        if modality not in MODALITY_DEFAULTS:
            raise InputError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITY_DEFAULTS)}")
        values = dict(MODALITY_DEFAULTS[modality])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("bias_correction_method", LEGACY_BIAS_CORRECTION) not in BIAS_CORRECTIONS:
            raise InputError(f"unknown bias-field correction {values['bias_correction_method']!r}; "
                             f"choose one of {', '.join(BIAS_CORRECTIONS)}")
        if values.get("resolution_mm") is not None and not values["resolution_mm"] > 0:
            raise InputError(f"the target resolution must be positive, got {values['resolution_mm']:g} mm")
        return cls(**values)


@dataclass
class PreprocessedSubject:
    """One subject on the atlas grid, with what is needed to go back to its own grid."""

    image: sitk.Image  # float32, normalised, background 0 (the reference sequence)
    mask: sitk.Image  # uint8 brain mask on the atlas grid
    atlas_to_subject: sitk.AffineTransform
    native_grid: dict[str, Any]
    parameter_text: str = ""
    normalization_stats: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    others: dict[str, sitk.Image] = field(default_factory=dict)  # other sequences, same grid and mask
    other_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    resolution: dict[str, Any] = field(default_factory=dict)  # input voxel size, blur, effective resolution (mm)

    @property
    def subject_to_atlas(self) -> sitk.AffineTransform:
        """Subject points -> atlas points (the inverse of ``atlas_to_subject``)."""
        return sitk.AffineTransform(self.atlas_to_subject.GetInverse())


def run_preprocessing(
    image: sitk.Image,
    config: PreprocessConfig,
    atlas: Atlas,
    mask_path: str | Path | None = None,
    others: dict[str, sitk.Image] | None = None,
    hdbet_weights: str | Path | None = None,
) -> PreprocessedSubject:
    """Run the whole chain on a scan held in memory (the reference) and any ``others`` of the same subject.

    ``others`` (sequence name -> scan) are resampled onto the reference's grid in
    physical space when their grids differ, masked with its brain mask, N4-corrected and
    normalised on their own, and warped with its transform. A registration that
    diverged (warped-mask Dice with the atlas below 0.5, a scale outside [0.5, 2], a
    non-finite transform) raises :class:`PreprocessError`.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    warnings: list[str] = []

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    native_image = image
    resolution: dict[str, Any] = {"input_voxel_mm": voxel_size_mm(image), "effective_mm": effective_voxel_mm(voxel_size_mm(image))}
    if config.resolution_mm:
        image, resolution = harmonize_resolution(image, config.resolution_mm)
        others = {name: harmonize_resolution(other, config.resolution_mm)[0] for name, other in (others or {}).items()}
        lap("harmonize_resolution")
    native_mask = extract_brain_mask(native_image, config.skull_strip, mask_path, hdbet_weights)
    lap("skull_strip")
    brain_ml = mask_volume_ml(native_mask)
    if brain_ml < MIN_BRAIN_ML and config.skull_strip != "none":
        raise PreprocessError(f"the brain mask is tiny ({brain_ml:.0f} ml): skull-stripping failed")
    if brain_ml <= 0:
        raise PreprocessError("the brain mask is empty")
    bias_quality: dict[str, float] = {}
    if config.bias_correction:
        image, bias_quality = _bias_correct(image, native_mask, config.bias_correction_method)
        lap("bias_correction")
    brain = sitk.Mask(image, native_mask)
    registration: Registration = register_to_atlas(brain, atlas.brain, config.registration)
    lap("registration")
    transform = registration.atlas_to_subject
    check_transform(transform)
    warped = sitk.Resample(brain, atlas.brain, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped_mask = sitk.Resample(sitk.Cast(native_mask, sitk.sitkFloat32), atlas.brain, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = binarize_and_open(warped_mask, config.mask_threshold, config.mask_opening_radius)
    lap("resample")
    mask_array = sitk.GetArrayViewFromImage(mask)
    if not mask_array.any():
        raise PreprocessError("the brain mask is empty after registration (registration diverged)")
    quality = registration_quality(sitk.GetArrayViewFromImage(warped), mask_array, atlas)
    quality.update({f"bias_{k}": v for k, v in bias_quality.items()})
    if not quality["mask_dice"] >= FAILED_REGISTRATION_DICE:
        raise PreprocessError(f"registration diverged: Dice of the warped brain mask with the atlas brain is "
                              f"{quality['mask_dice']:.2f} (< {FAILED_REGISTRATION_DICE})")
    if quality["mask_dice"] < POOR_REGISTRATION_DICE:
        warnings.append(f"poor registration: mask Dice {quality['mask_dice']:.2f} < {POOR_REGISTRATION_DICE}")
        log.warning("poor registration: Dice of the warped mask with the atlas mask is %.2f", quality["mask_dice"])
    normalized, stats = normalize_intensity(sitk.GetArrayFromImage(warped), mask_array, config.normalization,
                                            config.percentiles, config.ct_window)
    lap("normalization")
    prepared_others: dict[str, sitk.Image] = {}
    other_stats: dict[str, dict[str, float]] = {}
    for name, other in (others or {}).items():
        if not same_grid(other, image):
            warnings.append(f"{name} resampled onto the reference's grid")
            other = sitk.Resample(other, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        if config.bias_correction:
            other = _bias_correct(other, native_mask, config.bias_correction_method)[0]
        other_warped = sitk.Resample(sitk.Mask(other, native_mask), atlas.brain, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        try:
            other_normalized, other_stats[name] = normalize_intensity(
                sitk.GetArrayFromImage(other_warped), mask_array, config.normalization, config.percentiles, config.ct_window)
        except PreprocessError as exc:
            raise PreprocessError(f"{name}: {exc}") from None
        prepared_others[name] = array_like(other_normalized, atlas.brain)
    if prepared_others:
        lap("other_sequences")
    return PreprocessedSubject(
        image=array_like(normalized, atlas.brain),
        mask=mask,
        atlas_to_subject=transform,
        native_grid=grid_of(native_image),
        parameter_text=registration.parameter_text,
        normalization_stats=stats,
        timings=timings,
        quality=quality,
        others=prepared_others,
        other_stats=other_stats,
        warnings=warnings,
        resolution=resolution,
    )


def _bias_correct(image: sitk.Image, mask: sitk.Image, method: str) -> tuple[sitk.Image, dict[str, float]]:
    """N4 under the whole mask (``n4``) or on normal tissue only (``robust``)."""
    if method == "robust":
        from uadct.preprocess.tissue import correct_bias_field_robust

        return correct_bias_field_robust(image, mask)
    if method == "n4":
        return correct_bias_field(image, mask), {}
    raise PreprocessError(f"unknown bias correction {method!r}; choose one of {', '.join(BIAS_CORRECTIONS)}")


def check_transform(transform: sitk.AffineTransform, scale_range: tuple[float, float] = SCALE_RANGE) -> None:
    """Raise :class:`PreprocessError` for a non-finite transform or one that scales outside ``scale_range``."""
    matrix = np.array(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    translation = np.array(transform.GetTranslation(), dtype=np.float64)
    if not (np.isfinite(matrix).all() and np.isfinite(translation).all()):
        raise PreprocessError("registration diverged: the transform is not finite")
    scales = np.linalg.svd(matrix, compute_uv=False)
    low, high = scale_range
    if scales.min() < low or scales.max() > high:
        raise PreprocessError(f"registration diverged: the transform scales by {scales.min():.2f}..{scales.max():.2f} "
                              f"(outside {low:g}..{high:g})")


def registration_quality(normalized: np.ndarray, mask: np.ndarray, atlas: Atlas) -> dict[str, float]:
    """Dice of the warped brain mask with the atlas mask, and NCC of ``normalized`` (any intensity scale) with the atlas inside it."""
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
    for package in ("torch", "SimpleITK", "itk-elastix", "deepbet", "nnunetv2", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def subject_id(path: str | Path) -> str:
    """Subject id from a scan's file name (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``)."""
    return strip_nifti_suffix(path)


LEGACY_FILES: dict[str, Any] = {
    "images": {SINGLE: "image.nii.gz"},
    "mask": "mask.nii.gz",
    "atlas_to_subject": "atlas_to_subject.tfm",
    "subject_to_atlas": "subject_to_atlas.tfm",
    "elastix": "elastix_transform.txt",
}


def file_names(inputs: SubjectInputs, config: PreprocessConfig) -> dict[str, Any]:
    """The names of a prepared subject's files: BIDS derivative names for BIDS inputs, else ``image.nii.gz`` & co."""
    sequences = list(inputs.images)
    if inputs.bids_prefix is not None:
        return bids_file_names(inputs.bids_prefix, sequences, inputs.reference, config.atlas)
    names = dict(LEGACY_FILES)
    names["images"] = {name: "image.nii.gz" if name == inputs.reference else f"image-{name}.nii.gz" for name in sequences}
    return names


def _listed_files(files: dict[str, Any]) -> list[str]:
    return list(files["images"].values()) + [files[key] for key in ("mask", "atlas_to_subject", "subject_to_atlas", "elastix")]


def is_complete(subject_dir: Path, config: PreprocessConfig, input_sha256: str | dict[str, str] | None = None) -> bool:
    """True when a prepared folder is complete and was made with the same parameters and inputs.

    ``input_sha256``: the reference scan's checksum, or sequence -> checksum.
    """
    sidecar = subject_dir / SIDECAR
    if not sidecar.is_file():
        return False
    try:
        data = json.loads(sidecar.read_text())
        if PreprocessConfig.from_dict(data.get("config", {})) != config:
            return False
    except (OSError, json.JSONDecodeError, TypeError):
        return False
    recorded = {name: entry.get("sha256") for name, entry in data.get("inputs", {}).items()}
    if not recorded:  # format 1: one input
        recorded = {data.get("reference", SINGLE): data.get("input", {}).get("sha256")}
    if isinstance(input_sha256, str) and data.get("input", {}).get("sha256") != input_sha256:
        return False
    if isinstance(input_sha256, dict) and recorded != input_sha256:
        return False
    files = data.get("files", LEGACY_FILES)
    required = _listed_files(files)
    if "files" not in data:  # format 1 had no stored inverse (load_prepared computes it)
        required.remove(LEGACY_FILES["subject_to_atlas"])
    return all((subject_dir / name).is_file() for name in required)


def preprocess_file(
    path: str | Path,
    out_dir: str | Path,
    config: PreprocessConfig | None = None,
    atlas: Atlas | None = None,
    force: bool = False,
    mask_path: str | Path | None = None,
) -> tuple[Path, bool]:
    """Preprocess one scan into ``out_dir/<id>/``; returns (folder, was_skipped)."""
    return preprocess_subject(SubjectInputs.single(path), out_dir, config, atlas, force, mask_path)


def preprocess_subject(
    inputs: SubjectInputs,
    out_dir: str | Path,
    config: PreprocessConfig | None = None,
    atlas: Atlas | None = None,
    force: bool = False,
    mask_path: str | Path | None = None,
) -> tuple[Path, bool]:
    """Preprocess one subject (one or several sequences) into ``out_dir/<inputs.folder>``; returns (folder, was_skipped)."""
    config = config or PreprocessConfig()
    out_dir = Path(out_dir)
    subject_dir = out_dir / inputs.folder
    reference_path = inputs.reference_path
    if inputs.problem:
        raise InputError(f"{reference_path}: {inputs.problem}")
    if inputs.missing:
        raise InputError(f"{reference_path}: no {', '.join(inputs.missing)} scan for subject {inputs.subject}")
    for path in inputs.images.values():
        if not Path(path).is_file() and not is_dicom_folder(path):  # a DICOM series folder is one scan
            raise InputError(f"{path}: file not found")
    checksums = {name: sha256_of(path) for name, path in inputs.images.items()}
    if not force and is_complete(subject_dir, config, checksums):
        return subject_dir, True
    subject_dir.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(subject_dir.parent, subject_dir.name) as mine:
        if not mine:
            raise SubjectBusy(f"{reference_path}: another task is preprocessing {subject_dir}")
        remove_stale_temporaries(subject_dir)  # staging folders of a killed run
        if not force and is_complete(subject_dir, config, checksums):  # finished by another task meanwhile
            return subject_dir, True
        return _preprocess_locked(inputs, subject_dir, config, atlas, mask_path, checksums), False


class SubjectBusy(UadctError):
    """Another live task holds the subject's lock (array tasks sharing an output folder)."""


def _preprocess_locked(inputs: SubjectInputs, subject_dir: Path, config: PreprocessConfig, atlas: Atlas | None,
                       mask_path: str | Path | None, checksums: dict[str, str]) -> Path:
    """Run the chain and write the subject folder (the caller holds the subject's lock)."""
    reference_path = inputs.reference_path
    image = read_image(reference_path)
    others = {name: read_image(path) for name, path in inputs.images.items() if name != inputs.reference}
    atlas = atlas or load_atlas(config.atlas)
    try:
        result = run_preprocessing(image, config, atlas, mask_path, others)
    except UadctError as exc:
        raise type(exc)(f"{reference_path}: {exc}") from None
    files = file_names(inputs, config)
    sidecar = {
        "format": "uadct-preprocess/2",
        "subject": inputs.subject,
        "reference": inputs.reference,
        "sequences": list(inputs.images),
        "input": {"path": str(Path(reference_path).resolve()), "sha256": checksums[inputs.reference]},
        "inputs": {name: {"path": str(Path(path).resolve()), "sha256": checksums[name]} for name, path in inputs.images.items()},
        "versions": library_versions(),
        "config": config.to_dict(),
        "atlas": {"name": atlas.name, "sha256": atlas.checksum},
        "native_grid": result.native_grid,
        "resolution": result.resolution,
        "normalization_stats": result.normalization_stats,
        "sequence_normalization_stats": result.other_stats,
        "timings_s": result.timings,
        "quality": result.quality,
        "warnings": result.warnings,
        "files": files,
        "transforms": {
            "atlas_to_subject": {"file": files["atlas_to_subject"], "maps": "atlas points -> subject points (LPS mm); "
                                 "resampling onto the atlas grid uses it"},
            "subject_to_atlas": {"file": files["subject_to_atlas"], "maps": "subject points -> atlas points (LPS mm); "
                                 "resampling atlas-grid maps back onto the subject's grid uses it"},
        },
    }
    if config.skull_strip == "hd-bet" and mask_path is None:
        from uadct.preprocess.hdbet import checkpoint_sha256, resolve_weights

        sidecar["hdbet"] = {"weights": str(resolve_weights()), "checkpoint_sha256": checkpoint_sha256()}
    write_prepared(result, sidecar, subject_dir, files, inputs.reference)
    return subject_dir


def write_prepared(result: PreprocessedSubject, sidecar: dict[str, Any], subject_dir: Path,
                   files: dict[str, Any] | None = None, reference: str = SINGLE) -> None:
    """Write a prepared subject folder atomically (build under a temporary name, then rename)."""
    files = files or LEGACY_FILES
    subject_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{subject_dir.name}.", suffix=".tmp", dir=subject_dir.parent))
    try:
        os.chmod(staging, folder_mode())  # mkdtemp makes it 0700; the umask decides
        write_image(result.image, staging / files["images"][reference])
        for name, image in result.others.items():
            write_image(image, staging / files["images"][name])
        write_image(result.mask, staging / files["mask"])
        save_transform(result.atlas_to_subject, staging / files["atlas_to_subject"])
        save_transform(result.subject_to_atlas, staging / files["subject_to_atlas"])
        (staging / files["elastix"]).write_text(result.parameter_text)
        write_json(sidecar, staging / SIDECAR)
        previous = None
        if subject_dir.exists():  # moved aside, not deleted, until the new folder is in place
            previous = Path(tempfile.mkdtemp(prefix=f".{subject_dir.name}.", suffix=".old.tmp", dir=subject_dir.parent))
            subject_dir.rename(previous / subject_dir.name)
        staging.rename(subject_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except OSError as exc:  # disk full, read-only: one line, nothing half-written left
        shutil.rmtree(staging, ignore_errors=True)
        raise write_failure(subject_dir, exc) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass
class PreparedSubject:
    """A prepared subject read back from disk (one of its sequences)."""

    subject: str
    image: sitk.Image
    mask: sitk.Image
    atlas_to_subject: sitk.AffineTransform
    sidecar: dict[str, Any]
    sequence: str = SINGLE
    subject_to_atlas: sitk.AffineTransform | None = None

    @property
    def native_reference(self) -> sitk.Image:
        """An empty image on the subject's own grid (for resampling maps back)."""
        return grid_image(self.sidecar["native_grid"])

    @property
    def sequences(self) -> list[str]:
        """The sequences prepared for this subject (reference first)."""
        return list(self.sidecar.get("files", LEGACY_FILES)["images"])


def load_prepared(subject_dir: str | Path, sequence: str | None = None) -> PreparedSubject:
    """Read a folder written by :func:`preprocess_subject`; ``sequence`` picks one (default: the reference)."""
    subject_dir = Path(subject_dir)
    sidecar_path = subject_dir / SIDECAR
    if not sidecar_path.is_file():
        raise InputError(f"{subject_dir}: not a prepared subject folder (no {SIDECAR}); run `uadct preprocess` first")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{sidecar_path}: corrupt JSON") from None
    files = sidecar.get("files", LEGACY_FILES)
    reference = sidecar.get("reference", SINGLE)
    sequence = sequence or reference
    if sequence not in files["images"]:
        raise InputError(f"{subject_dir}: no sequence {sequence!r}; it has {', '.join(files['images'])}")
    image = read_image(subject_dir / files["images"][sequence])
    mask = read_image(subject_dir / files["mask"], allow_empty=True)
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    transform = load_affine(subject_dir / files["atlas_to_subject"])
    inverse_path = subject_dir / files["subject_to_atlas"]
    inverse = load_affine(inverse_path) if inverse_path.is_file() else sitk.AffineTransform(transform.GetInverse())
    return PreparedSubject(sidecar.get("subject", subject_dir.name), image, mask, transform, sidecar, sequence, inverse)


def find_prepared(prep_dir: str | Path) -> list[Path]:
    """Prepared subject folders in ``prep_dir``, sorted: ``<id>/`` children, or BIDS ``sub-*/[ses-*/]anat/``."""
    prep_dir = Path(prep_dir)
    if not prep_dir.is_dir():
        raise InputError(f"{prep_dir}: not a folder")
    found = [p for p in prep_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / SIDECAR).is_file()]
    found += [p for pattern in ("sub-*/anat", "sub-*/ses-*/anat") for p in prep_dir.glob(pattern) if (p / SIDECAR).is_file()]
    return sorted(set(found))


def prepared_name(folder: str | Path) -> str:
    """A prepared folder's id: ``prep/sub-01`` -> ``sub-01``; BIDS ``sub-01/ses-2/anat`` -> ``sub-01_ses-2``."""
    folder = Path(folder)
    if folder.name != "anat":
        return folder.name
    parts = [part for part in folder.parent.parts if part.startswith(("sub-", "ses-"))]
    return "_".join(parts[-2:] if len(parts) >= 2 and parts[-1].startswith("ses-") else parts[-1:]) or folder.parent.name


@dataclass
class SubjectRecord:
    """What happened to one subject of a batch: status ``done``, ``skipped`` or ``failed``."""

    subject: str
    input: Path
    status: str
    seconds: float
    folder: Path | None = None
    error: str | None = None


@dataclass
class BatchOutcome:
    """What happened to each input of a batch (``records`` in input order)."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    busy: list[tuple[Path, str]] = field(default_factory=list)  # another live task was writing them
    records: list[SubjectRecord] = field(default_factory=list)


def preprocess_many(
    paths: list[Path | SubjectInputs],
    out_dir: str | Path,
    config: PreprocessConfig | None = None,
    force: bool = False,
    progress: Callable[[Path, str], None] | None = None,
    jobs: int = 1,
) -> BatchOutcome:
    """Preprocess many scans (or :class:`SubjectInputs`); a failing subject is recorded and the batch carries on.

    ``jobs`` > 1 runs subjects in that many worker processes (``spawn`` start method, so
    safe with torch and ITK threads); each worker loads the atlas once and uses
    ``cpu_count // jobs`` threads. Outputs do not depend on ``jobs``; ``outcome`` lists
    keep the input order and ``progress`` is called as each subject finishes. BIDS
    inputs make ``out_dir`` a BIDS derivative (its ``dataset_description.json``).
    """
    config = config or PreprocessConfig()
    if jobs < 1:
        raise InputError(f"jobs must be at least 1, got {jobs}")
    subjects = [p if isinstance(p, SubjectInputs) else SubjectInputs.single(p) for p in paths]
    outcome = BatchOutcome()
    results: dict[int, tuple[str, Path | str, float]] = {}

    def record(index: int, status: str, value: Path | str, seconds: float) -> None:
        results[index] = (status, value, seconds)
        if progress is not None:
            progress(Path(subjects[index].reference_path), status)

    atlas = load_atlas(config.atlas)  # fails early, for any number of jobs, when the atlas is missing
    if any(s.bids_prefix is not None for s in subjects):
        write_derivative_description(out_dir)
    jobs = min(jobs, len(subjects))
    if jobs <= 1:
        for index, inputs in enumerate(subjects):
            record(index, *_preprocess_one(inputs, out_dir, config, atlas, force))
    else:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        del atlas  # each worker loads its own
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(config.atlas, threads)) as pool:
            futures = {pool.submit(_worker_preprocess, inputs, out_dir, config, force): index
                       for index, inputs in enumerate(subjects)}
            for future in as_completed(futures):
                record(futures[future], *future.result())
    for index, inputs in enumerate(subjects):
        status, value, seconds = results[index]
        path = Path(inputs.reference_path)
        if status in ("failed", "busy"):
            (outcome.failed if status == "failed" else outcome.busy).append((path, str(value)))
            outcome.records.append(SubjectRecord(inputs.subject, path, status, seconds, error=str(value)))
        else:
            (outcome.skipped if status == "skipped" else outcome.done).append(Path(value))
            outcome.records.append(SubjectRecord(inputs.subject, path, status, seconds, folder=Path(value)))
    return outcome


def _preprocess_one(inputs: SubjectInputs, out_dir: str | Path, config: PreprocessConfig, atlas: Atlas | None,
                    force: bool) -> tuple[str, Path | str, float]:
    """(status, folder or error message, seconds) of one subject; UadctErrors become ``failed``."""
    start = time.perf_counter()
    try:
        folder, skipped = preprocess_subject(inputs, out_dir, config, atlas, force)
    except SubjectBusy as exc:
        return "busy", str(exc), round(time.perf_counter() - start, 3)
    except UadctError as exc:
        return "failed", str(exc), round(time.perf_counter() - start, 3)
    return ("skipped" if skipped else "done"), folder, round(time.perf_counter() - start, 3)


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


def _worker_preprocess(inputs: SubjectInputs, out_dir: str | Path, config: PreprocessConfig,
                       force: bool) -> tuple[str, Path | str, float]:
    return _preprocess_one(inputs, out_dir, config, _worker_atlas.get(config.atlas), force)
