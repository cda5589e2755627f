"""Intensity steps: N4 bias-field correction and normalisation under the brain mask."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from uadct.errors import PreprocessError

NORMALIZATIONS = ("tissue", "percentile", "zscore", "ct-window")
TISSUE_SDS_PER_UNIT = 4.0  # tissue normalisation: this many robust SDs of normal tissue span one unit
CT_BRAIN_WINDOW_HU = (40.0, 80.0)  # (level, width) of the standard brain window, Hounsfield units


def correct_bias_field(image: sitk.Image, mask: sitk.Image, shrink: int = 4, iterations: int = 50) -> sitk.Image:
    """N4 bias-field correction estimated under ``mask`` on a grid shrunk by ``shrink``.

    The field is fitted on the shrunk image (fast, ~5 s for 240x240x155 at shrink 4)
    and applied at full resolution.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    positive = sitk.GetImageFromArray(np.clip(array, 0, None) + 1.0)
    positive.CopyInformation(image)
    small_image = sitk.Shrink(positive, [shrink] * 3)
    small_mask = sitk.Shrink(sitk.Cast(mask, sitk.sitkUInt8), [shrink] * 3)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([iterations] * 3)
    corrector.Execute(small_image, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(positive)
    corrected = sitk.GetArrayFromImage(positive) / np.exp(sitk.GetArrayViewFromImage(log_field)) - 1.0
    result = sitk.GetImageFromArray(corrected.astype(np.float32))
    result.CopyInformation(image)
    return result


def normalize_intensity(
    array: np.ndarray,
    mask: np.ndarray,
    method: str = "percentile",
    percentiles: tuple[float, float] = (5.0, 95.0),
    ct_window: tuple[float, float] = CT_BRAIN_WINDOW_HU,
) -> tuple[np.ndarray, dict[str, float]]:
    """Normalise ``(D, H, W)`` intensities under ``mask``; background set to 0.

    ``tissue``: the median of the normal tissue maps to 0.5 and 4 of its robust SDs to
    one unit, so median -+ 2 SD -> 0 and 1 (see
    :func:`uadct.preprocess.tissue.tissue_statistics`; robust to lesions). ``percentile``: the low percentile maps to 0 and the high one to 1
    (the papers' default, 5/95). ``zscore``: zero mean, unit standard deviation under the mask.
    ``ct-window``: a fixed window of a CT in Hounsfield units, ``ct_window`` = (level,
    width) in HU: level - width/2 maps to 0, level + width/2 to 1, clipped to [0, 1].
    Returns the float32 array and the statistics used.
    """
    inside = array[mask > 0]
    if inside.size == 0:
        raise PreprocessError("the brain mask is empty: nothing to normalise")
    if method == "tissue":
        from uadct.preprocess.tissue import tissue_statistics

        stats = tissue_statistics(array, mask)
        scale = TISSUE_SDS_PER_UNIT * stats["tissue_sd"]
        offset = stats["tissue_median"] - 0.5 * scale
    elif method == "percentile":
        low, high = np.percentile(inside, percentiles)
        scale = high - low
        stats = {"low": float(low), "high": float(high)}
        offset = low
    elif method == "ct-window":
        level, width = (float(v) for v in ct_window)
        if not width > 0:
            raise PreprocessError(f"the CT window width must be positive, got {width:g} HU")
        offset, scale = level - width / 2.0, width
        stats = {"level": level, "width": width}
    elif method == "zscore":
        offset, scale = float(inside.mean()), float(inside.std())
        stats = {"mean": offset, "std": scale}
    else:
        raise PreprocessError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if not scale > 0:
        raise PreprocessError("the brain has constant intensity: cannot normalise")
    normalized = ((array - offset) / scale).astype(np.float32)
    if method == "ct-window":
        np.clip(normalized, 0.0, 1.0, out=normalized)
    normalized[mask == 0] = 0.0
    return normalized, stats
