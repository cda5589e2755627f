"""The preprocessing chain for one subject.

raw scan -> brain mask (skull-strip) -> N4 (MR) -> affine registration of the brain to
the atlas -> image and mask resampled onto the atlas grid (mask binarised at 0.5 and
opened with radius 2) -> intensity normalisation under the mask, background 0. With
several sequences, the reference is skull-stripped and registered; the others are
resampled onto its grid (scanner coordinates), share its mask and transform, and get
their own N4 and normalisation.

:func:`run_preprocessing` works in memory and returns a
:class:`~uadct.preprocess.prepared.PreparedSubject`; :func:`preprocess_subject` runs it
for one subject's files and writes the prepared folder
(:mod:`uadct.preprocess.prepared` owns that format) under the subject's lock.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from uadct.atlas import Atlas, load_atlas
from uadct.dicom import is_dicom_folder
from uadct.errors import InputError, PreprocessError, UadctError
from uadct.io import array_like, grid_of, library_versions, read_image, same_grid, sha256_of, strip_nifti_suffix
from uadct.locks import output_lock, remove_stale_temporaries
from uadct.preprocess.bids import SubjectInputs
from uadct.preprocess.config import BIAS_CORRECTIONS, PreprocessConfig
from uadct.preprocess.intensity import correct_bias_field, normalize_intensity
from uadct.preprocess.masks import binarize_and_open, mask_volume_ml
from uadct.preprocess.prepared import PreparedSubject, file_names, is_complete, write_prepared
from uadct.preprocess.register import Registration, register_to_atlas
from uadct.preprocess.resolution import effective_voxel_mm, harmonize_resolution, voxel_size_mm
from uadct.preprocess.skullstrip import extract_brain_mask

log = logging.getLogger(__name__)

MIN_BRAIN_ML = 200.0  # an adult brain is ~1200 ml; far less means skull-stripping failed
POOR_REGISTRATION_DICE = 0.8  # below: a warning in the sidecar and the summary
FAILED_REGISTRATION_DICE = 0.5  # below: the subject fails (registration diverged)
SCALE_RANGE = (0.5, 2.0)  # singular values of the atlas->subject matrix outside: diverged



def run_preprocessing(
    image: sitk.Image,
    config: PreprocessConfig,
    atlas: Atlas | None,
    mask_path: str | Path | None = None,
    others: dict[str, sitk.Image] | None = None,
    hdbet_weights: str | Path | None = None,
) -> PreparedSubject:
    """Run the whole chain on a scan held in memory (the reference) and any ``others`` of the same subject.

    ``others`` (sequence name -> scan) are resampled onto the reference's grid in
    physical space when their grids differ, masked with its brain mask, N4-corrected and
    normalised on their own, and warped with its transform. A registration that
    diverged (warped-mask Dice with the atlas below 0.5, a scale outside [0.5, 2], a
    non-finite transform) raises :class:`PreprocessError`. A 2D image (``config.is_2d``;
    ``atlas`` None) goes through :func:`uadct.preprocess.image2d.prepare_image_2d` instead.
    """
    if config.is_2d:  # 2D images: resized and normalised, no atlas (uadct.preprocess.image2d)
        from uadct.preprocess.image2d import prepare_image_2d

        return prepare_image_2d(image, config)
    if min(image.GetSize()) < 2:  # a 2D image read as one slice (uadct.images2d)
        raise InputError(f"expected a 3D volume, found one slice of size {image.GetSize()}; "
                         "2D images need --modality xray or image")
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
    registration: Registration = register_to_atlas(brain, atlas.brain, config.registration, backend=config.registration_backend)
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
    return PreparedSubject(
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


def subject_id(path: str | Path) -> str:
    """Subject id from a scan's file name (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``)."""
    return strip_nifti_suffix(path)


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
    atlas = atlas or (None if config.is_2d else load_atlas(config.atlas))
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
        "atlas": {"name": atlas.name, "sha256": atlas.checksum} if atlas is not None else {"name": config.atlas, "sha256": None},
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

