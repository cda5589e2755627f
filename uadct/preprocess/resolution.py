"""Resolution harmonisation: blur a finer scan to the effective resolution a model was trained at.

A model trained on 2 mm scans that scores a 0.9 mm scan sees sulci and ventricle borders
sharper than anything in training and lights them up. Each voxel's point-spread function
is modelled as a Gaussian whose FWHM is the voxel size; bringing a voxel of size ``s`` to a
target ``t`` > ``s`` takes a Gaussian of FWHM ``sqrt(t^2 - s^2)`` along that axis (FWHMs of
Gaussians add in quadrature). Axes already at ``t`` or coarser are left alone.

The training side records each subject's effective voxel size in its preprocessing sidecar
(:func:`effective_voxel_mm`); the checkpoint keeps the coarsest of the training subjects
(:func:`coarsest_training_mm`), and scoring a raw scan blurs it to that before the chain.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import SimpleITK as sitk

from uadct.errors import PreprocessError

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # ~2.3548
TOLERANCE_MM = 0.05  # voxel sizes within this of the target count as already there


def voxel_size_mm(image: sitk.Image) -> list[float]:
    """The scan's voxel size along its own axes (mm), as stored."""
    return [float(s) for s in image.GetSpacing()]


def effective_voxel_mm(spacing: Iterable[float], target_mm: float | None = None) -> float:
    """A scan's effective resolution as one number (mm): its largest voxel side, or ``target_mm`` if coarser."""
    largest = max(float(s) for s in spacing)
    return max(largest, float(target_mm)) if target_mm else largest


def blur_sigmas_mm(spacing: Iterable[float], target_mm: float) -> list[float]:
    """Gaussian sigma (mm) per axis that brings voxels of ``spacing`` (mm) to an effective ``target_mm``."""
    if not target_mm > 0:
        raise PreprocessError(f"the target resolution must be positive, got {target_mm:g} mm")
    sigmas = []
    for size in spacing:
        size = float(size)
        fwhm = math.sqrt(max(target_mm**2 - size**2, 0.0)) if target_mm > size + TOLERANCE_MM else 0.0
        sigmas.append(fwhm / FWHM_PER_SIGMA)
    return sigmas


def harmonize_resolution(image: sitk.Image, target_mm: float) -> tuple[sitk.Image, dict[str, Any]]:
    """Blur ``image`` on its own grid to an effective resolution of ``target_mm``; geometry unchanged.

    Returns the float32 image (the input itself when no axis is finer than the target)
    and what was done: the input voxel size, the sigmas (mm) and the effective resolution.
    """
    spacing = voxel_size_mm(image)
    sigmas = blur_sigmas_mm(spacing, target_mm)
    info: dict[str, Any] = {"target_mm": float(target_mm), "input_voxel_mm": spacing,
                            "sigma_mm": [round(s, 4) for s in sigmas], "effective_mm": effective_voxel_mm(spacing, target_mm)}
    if not any(sigmas):
        info["effective_mm"] = effective_voxel_mm(spacing)
        return image, info
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    from scipy import ndimage

    # numpy axes are (z, y, x); SimpleITK spacing is (x, y, z)
    sigma_voxels = [s / size for s, size in zip(sigmas, spacing)][::-1]
    blurred = ndimage.gaussian_filter(array, sigma_voxels, mode="nearest", truncate=3.0).astype(np.float32)
    result = sitk.GetImageFromArray(blurred)
    result.CopyInformation(image)
    return result, info


def coarsest_training_mm(sidecars: Iterable[dict[str, Any]]) -> float | None:
    """The coarsest effective resolution (mm) among prepared subjects' sidecars; None when none records a grid."""
    values = []
    for sidecar in sidecars:
        resolution = sidecar.get("resolution", {})
        if "effective_mm" in resolution:
            values.append(float(resolution["effective_mm"]))
        elif "native_grid" in sidecar:
            values.append(effective_voxel_mm(sidecar["native_grid"]["spacing"]))
    return max(values) if values else None


def training_resolution(sidecars: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint records about its training data's resolution (``coarsest_training_mm``, or None)."""
    return {"coarsest_training_mm": coarsest_training_mm(sidecars)}


def harmonized_config(config: Any, metadata: dict[str, Any], enabled: bool = True) -> Any:
    """``config`` (a PreprocessConfig) with ``resolution_mm`` set to the checkpoint's coarsest training resolution.

    Unchanged when ``enabled`` is False, when the checkpoint records no resolution (older
    checkpoints), or when the config already sets one (its training cohort was harmonised).
    """
    import dataclasses

    coarsest = (metadata.get("resolution") or {}).get("coarsest_training_mm")
    if not enabled or not coarsest or config.resolution_mm:
        return config
    return dataclasses.replace(config, resolution_mm=float(coarsest))
