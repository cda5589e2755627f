"""Skull-stripping backends: each returns a uint8 brain mask on the input's grid.

``deepbet`` (default for MR; weights ship inside its wheel) and ``none`` (input already
skull-stripped: the mask is the nonzero region, or a given mask file).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uadct.errors import PreprocessError
from uadct.io import read_mask

log = logging.getLogger(__name__)

SKULL_STRIP_BACKENDS = ("deepbet", "none")


def extract_brain_mask(image: sitk.Image, backend: str = "deepbet", mask_path: str | Path | None = None) -> sitk.Image:
    """Brain mask (uint8, 1 = brain) of a head scan, on the scan's own grid."""
    if mask_path is not None:
        return read_mask(mask_path, reference=image)
    if backend == "deepbet":
        return _deepbet_mask(image)
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
