"""Skull-stripping backends: each returns a uint8 brain mask on the input's grid.

``deepbet`` (default for MR; weights ship inside its wheel), ``hd-bet`` (HD-BET 2.0's
nnU-Net model, weights downloaded by HD-BET; see :mod:`uadct.preprocess.hdbet`), ``ct`` (head CT in
Hounsfield units: soft tissue inside the bony skull, by thresholds and morphology) and
``none`` (input already skull-stripped: the mask is the nonzero region, or a given mask
file).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uadct.errors import PreprocessError
from uadct.io import read_mask
from uadct.preprocess.masks import keep_largest_component

log = logging.getLogger(__name__)

SKULL_STRIP_BACKENDS = ("deepbet", "hd-bet", "ct", "none")

# Head CT thresholds (Hounsfield units) and morphology sizes (mm).
CT_BONE_MIN_HU = 300.0  # cortical bone is ~700-2000 HU; calcifications and contrast stay below ~300
CT_BRAIN_MIN_HU = 0.0  # CSF ~0-15 HU, grey/white matter ~20-45 HU, fat/air below 0
CT_BRAIN_MAX_HU = 100.0  # fresh blood ~60-90 HU stays inside; bone partial volume above is cut
CT_BONE_MARGIN_MM = 2.0  # soft tissue this close to bone (partial volume, dura, muscle) is not brain
CT_OPENING_MM = 3.0  # opening that cuts thin bridges (optic canals, foramen magnum) before the largest component


def extract_brain_mask(image: sitk.Image, backend: str = "deepbet", mask_path: str | Path | None = None,
                       hdbet_weights: str | Path | None = None) -> sitk.Image:
    """Brain mask (uint8, 1 = brain) of a head scan, on the scan's own grid.

    ``hdbet_weights``: the HD-BET weights folder (default: ``$UADCT_HDBET_WEIGHTS``, then
    ``~/hd-bet_params/release_2.0.0``).
    """
    if mask_path is not None:
        return read_mask(mask_path, reference=image)
    if backend == "deepbet":
        return _deepbet_mask(image)
    if backend == "hd-bet":
        from uadct.preprocess.hdbet import hdbet_mask

        return hdbet_mask(image, hdbet_weights)
    if backend == "ct":
        return ct_brain_mask(image)
    if backend == "none":
        array = sitk.GetArrayViewFromImage(image)
        mask = sitk.GetImageFromArray((array != 0).astype(np.uint8))
        mask.CopyInformation(image)
        return mask
    raise PreprocessError(f"unknown skull-strip backend {backend!r}; choose one of {', '.join(SKULL_STRIP_BACKENDS)}")


@functools.lru_cache(maxsize=1)
def _deepbet_model():
    import torch
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=not torch.cuda.is_available())


def _deepbet_mask(image: sitk.Image, threshold: float = 0.5) -> sitk.Image:
    """Run deepbet on the scan in RAS canonical order (what its networks expect)."""
    ras = sitk.DICOMOrient(image, "RAS")
    volume = np.ascontiguousarray(sitk.GetArrayFromImage(ras).transpose(2, 1, 0))  # (i, j, k) RAS+
    model = _deepbet_model()
    try:
        probability = model.run_model(volume.copy())
        mask = model.postprocess(probability > threshold)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise PreprocessError(f"deepbet found no brain ({exc})") from None
    mask_image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8))
    mask_image.CopyInformation(ras)
    # back to the input's voxel order: a pure axis permutation/flip, exact with nearest neighbour
    return sitk.Resample(mask_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def _radius_voxels(image: sitk.Image, millimetres: float) -> list[int]:
    """A ball of ``millimetres`` as per-axis radii in voxels (at least 1)."""
    return [max(1, int(round(millimetres / spacing))) for spacing in image.GetSpacing()]


def ct_brain_mask(
    image: sitk.Image,
    soft_tissue_hu: tuple[float, float] = (CT_BRAIN_MIN_HU, CT_BRAIN_MAX_HU),
    bone_min_hu: float = CT_BONE_MIN_HU,
    bone_margin_mm: float = CT_BONE_MARGIN_MM,
    opening_mm: float = CT_OPENING_MM,
) -> sitk.Image:
    """Brain mask of a head CT in Hounsfield units (uint8, on the scan's grid).

    Bone is everything above ``bone_min_hu``; the inside of the skull is what the bone
    (closed by ``bone_margin_mm``) encloses in each axial slice, so the foramen magnum,
    a hole in the skull's floor, does not let the neck in. Brain = voxels of the
    inside in the soft-tissue range ``soft_tissue_hu`` farther than ``bone_margin_mm``
    from bone, opened by ``opening_mm`` to cut thin bridges (optic canals), the largest
    connected component, grown back by the margin within soft tissue (not into bone),
    holes (ventricles, bleeds outside the range) filled slice-wise and in 3D.
    """
    from scipy import ndimage

    hu = sitk.Cast(image, sitk.sitkFloat32)
    bone = sitk.Cast(hu > bone_min_hu, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(bone).any():
        raise PreprocessError(f"no bone above {bone_min_hu:g} HU: not a head CT in Hounsfield units?")
    margin = _radius_voxels(image, bone_margin_mm)
    closed_bone = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(bone, margin, sitk.sitkBall)) > 0
    axial = _axial_array_axis(image)
    inside = np.moveaxis(closed_bone, axial, 0).copy()
    for index in range(inside.shape[0]):
        if inside[index].any():
            inside[index] = ndimage.binary_fill_holes(inside[index])
    inside = np.moveaxis(inside, 0, axial) & ~closed_bone
    if not inside.any():
        raise PreprocessError("the bone encloses nothing in any axial slice: no skull found in this CT")
    inside_image = sitk.GetImageFromArray(inside.astype(np.uint8))
    inside_image.CopyInformation(image)
    low, high = soft_tissue_hu
    soft = sitk.Cast((hu >= low) & (hu <= high), sitk.sitkUInt8)
    bone_zone = sitk.BinaryDilate(bone, margin, sitk.sitkBall)
    candidate = sitk.Mask(sitk.Mask(soft, inside_image), sitk.Cast(bone_zone == 0, sitk.sitkUInt8))
    candidate = sitk.BinaryMorphologicalOpening(candidate, _radius_voxels(image, opening_mm), sitk.sitkBall)
    if not sitk.GetArrayViewFromImage(candidate).any():
        raise PreprocessError(f"no soft tissue in {low:g}..{high:g} HU inside the skull: not a head CT?")
    brain = keep_largest_component(candidate)
    # give back what the bone margin took at the brain surface, within soft tissue inside the skull
    brain = sitk.BinaryDilate(brain, margin, sitk.sitkBall)
    brain = sitk.Mask(sitk.Mask(brain, soft), inside_image)
    return _fill_holes(keep_largest_component(brain))


def _axial_array_axis(image: sitk.Image) -> int:
    """The numpy axis (of ``GetArrayFromImage``'s (k, j, i) order) closest to superior-inferior."""
    direction = np.array(image.GetDirection()).reshape(3, 3)  # columns: i, j, k directions in LPS
    image_axis = int(np.argmax(np.abs(direction[2, :])))
    return 2 - image_axis


def _fill_holes(mask: sitk.Image) -> sitk.Image:
    """Fill enclosed holes slice by slice (along each axis) and in 3D."""
    array = sitk.GetArrayFromImage(mask) > 0
    from scipy import ndimage

    for axis in range(3):
        moved = np.moveaxis(array, axis, 0)
        for index in range(moved.shape[0]):
            if moved[index].any():
                moved[index] = ndimage.binary_fill_holes(moved[index])
    array = ndimage.binary_fill_holes(array)
    filled = sitk.GetImageFromArray(array.astype(np.uint8))
    filled.CopyInformation(mask)
    return filled
