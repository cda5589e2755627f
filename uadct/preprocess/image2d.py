"""The preprocessing of 2D images (``--modality xray|image``): resize, field-of-view mask, normalise.

A 2D image is a volume of one slice ``(1, H, W)`` (:mod:`uadct.images2d`). It is not
skull-stripped, bias-corrected or registered. It is resampled onto a grid of
``image_size`` = (H', W') pixels **covering the same physical area**, so the prepared image
and the input share one physical space: the prepared folder's ``atlas_to_subject``
transform is the identity, and a map on the prepared grid goes back to the input's own
size and geometry by plain resampling, as for volumes.

- ``resize="pad"`` (default): square pixels of ``max(width_mm / W', height_mm / H')``, the
  whole image fits and the short side is padded (centred) with zeros outside the mask;
  ``crop``: square pixels of ``min(...)``, the centre fills the grid and the long side is cut
  (its edges get no score: the map is 0 there); ``stretch``: each axis on its own (aspect
  not kept). Downsampling is preceded by a Gaussian blur of sigma ``(factor - 1) / 2``
  input pixels per axis (anti-aliasing); resampling is linear.
- The mask (where patches are scored and the image score is taken): ``image``: the whole
  input area on the new grid; ``nonzero``: pixels that were not 0 as read (the black border
  of a collimated X-ray or a padded photo); ``otsu``: the brighter side of an Otsu
  threshold, its largest connected part with holes filled (a bright object on a dark
  background, e.g. a CT slide's head). A lung mask is not made: no honest one exists here
  without trained weights.
- Normalisation under the mask (background 0): ``percentile`` (1st -> 0, 99th -> 1 by
  default), ``zscore``, ``ct-window`` (``--ct-level/--ct-width`` in HU) or ``dicom-window``
  (the DICOM file's own Window Center/Width).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import SimpleITK as sitk

from uadct.errors import InputError, PreprocessError
from uadct.io import grid_of

from uadct.preprocess.config import FOV_MASKS  # the 2D settings (resize modes, masks) live with the others


def resized_grid(native: sitk.Image, size: tuple[int, int], mode: str) -> sitk.Image:
    """An empty float32 grid of ``size`` = (H, W) pixels over the same physical area as ``native`` (centred)."""
    width, height, _ = native.GetSize()
    sx, sy, sz = native.GetSpacing()
    out_h, out_w = size
    extent_x, extent_y = width * sx, height * sy
    if mode == "stretch":
        px, py = extent_x / out_w, extent_y / out_h
    else:
        pick = max if mode == "pad" else min
        px = py = pick(extent_x / out_w, extent_y / out_h)
    direction = np.array(native.GetDirection()).reshape(3, 3)
    centre = np.array(native.TransformContinuousIndexToPhysicalPoint(((width - 1) / 2.0, (height - 1) / 2.0, 0.0)))
    origin = centre - direction @ np.array([(out_w - 1) / 2.0 * px, (out_h - 1) / 2.0 * py, 0.0])
    grid = sitk.Image([out_w, out_h, 1], sitk.sitkFloat32)
    grid.SetSpacing((px, py, sz))
    grid.SetOrigin(tuple(float(v) for v in origin))
    grid.SetDirection(native.GetDirection())
    return grid


def _antialiased(native: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """``native`` blurred by sigma (factor - 1) / 2 input pixels per in-plane axis where ``grid`` is coarser."""
    from scipy.ndimage import gaussian_filter

    factors = [g / n for g, n in zip(grid.GetSpacing()[:2], native.GetSpacing()[:2])]
    sigmas = [max(0.0, (f - 1.0) / 2.0) for f in factors]  # (x, y)
    if not any(s > 0 for s in sigmas):
        return native
    array = sitk.GetArrayFromImage(native)[0].astype(np.float32)
    blurred = gaussian_filter(array, sigma=(sigmas[1], sigmas[0]), mode="nearest")
    result = sitk.GetImageFromArray(blurred[np.newaxis])
    result.CopyInformation(native)
    return result


def _resample(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def field_of_view_mask(native: sitk.Image, grid: sitk.Image, resized: np.ndarray, method: str) -> np.ndarray:
    """The scored area on ``grid`` ``(1, H, W)`` uint8 (see the module docstring)."""
    ones = sitk.Image(native.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(native)
    area = _resample(ones, grid) >= 0.5
    if method == "image":
        return area.astype(np.uint8)
    if method == "nonzero":
        nonzero = sitk.Cast(sitk.GetImageFromArray((sitk.GetArrayViewFromImage(native) != 0).astype(np.float32)), sitk.sitkFloat32)
        nonzero.CopyInformation(native)
        return (area & (_resample(nonzero, grid) >= 0.5)).astype(np.uint8)
    if method == "otsu":
        from scipy.ndimage import binary_fill_holes, label

        values = resized[area]
        if values.size == 0 or values.max() <= values.min():
            raise PreprocessError("the image is constant: no Otsu field of view")
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.SetInsideValue(0)
        otsu.SetOutsideValue(1)
        otsu.Execute(sitk.GetImageFromArray(np.where(area, resized, values.min())[0]))
        bright = area[0] & (resized[0] > otsu.GetThreshold())
        parts, count = label(bright)
        if count == 0:
            raise PreprocessError("the Otsu field-of-view mask is empty")
        largest = parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
        return binary_fill_holes(largest)[np.newaxis].astype(np.uint8)
    raise InputError(f"unknown field-of-view mask {method!r}; choose one of {', '.join(FOV_MASKS)}")


def prepare_image_2d(image: sitk.Image, config: Any) -> Any:
    """Resize, mask and normalise a one-slice image; returns a
    :class:`~uadct.preprocess.prepared.PreparedSubject` whose ``atlas_to_subject`` is the identity.

    ``config``: a :class:`~uadct.preprocess.config.PreprocessConfig` with ``image_size`` set.
    """
    from uadct.images2d import dicom_window, image_notes
    from uadct.preprocess.intensity import normalize_intensity
    from uadct.preprocess.prepared import PreparedSubject

    if image.GetDimension() != 3 or image.GetSize()[2] != 1:
        raise InputError(f"expected a 2D image (one slice), found a volume of size {image.GetSize()}; "
                         "use --modality mr or ct for volumes")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    grid = resized_grid(image, tuple(config.image_size), config.resize)
    resized = _resample(_antialiased(image, grid), grid)
    timings["resize"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    mask = field_of_view_mask(image, grid, resized, config.fov_mask)
    if not mask.any():
        raise PreprocessError(f"the field-of-view mask ({config.fov_mask}) is empty")
    method, window = config.normalization, tuple(config.ct_window)
    if method == "dicom-window":
        window = dicom_window(image)
        if window is None:
            raise InputError("--normalization dicom-window: the image has no DICOM Window Center/Width; "
                             "give --normalization ct-window with --ct-level and --ct-width")
        method = "ct-window"
    normalized, stats = normalize_intensity(resized, mask, method, tuple(config.percentiles), window)
    timings["normalization"] = round(time.perf_counter() - clock, 3)
    prepared_image = sitk.GetImageFromArray(normalized.astype(np.float32))
    prepared_image.CopyInformation(grid)
    mask_image = sitk.GetImageFromArray(mask)
    mask_image.CopyInformation(grid)
    identity = sitk.AffineTransform(3)
    width, height, _ = image.GetSize()
    resize_record = {
        "input_size": [height, width], "input_pixel_mm": list(image.GetSpacing()[:2]),
        "prepared_size": list(config.image_size), "prepared_pixel_mm": list(grid.GetSpacing()[:2]),
        "mode": config.resize, "fov_mask": config.fov_mask, "mask_fraction": round(float(mask.mean()), 4),
    }
    return PreparedSubject(
        image=prepared_image, mask=mask_image, atlas_to_subject=identity, native_grid=grid_of(image),
        parameter_text="", normalization_stats=stats,
        timings=timings, quality={}, warnings=image_notes(image),
        resolution={"effective_mm": float(max(grid.GetSpacing()[:2])), "resize": resize_record},
    )
