"""Lesion-robust intensity steps: N4 fitted on normal tissue only, and normalisation anchored on normal tissue.

A large lesion breaks the two classic steps. N4 fitted under the whole brain mask takes a
large hyper-intense region for bias field and flattens it; percentiles of a lesioned brain
move with the lesion load, so normalised maps of different subjects stop being comparable.

- :func:`tissue_peak`: peaks of the brain histogram: the highest (refined as a "white
  stripe", Shinohara et al. 2014) and the brightest that is at least half as high
  (white matter on T1, grey/white matter on FLAIR), with their widths.
- :func:`normal_tissue_mask`: brain voxels neither brighter than the brightest large peak
  plus ``k`` of its SDs nor darker than the brain median minus ``k`` robust SDs; a lesion
  far brighter or darker than the tissue falls out (and so may CSF, which N4 does not need).
- :func:`correct_bias_field_robust`: N4 (SimpleITK, shrunk grid) fitted only under that
  mask, found on the raw scan, then found again on the corrected one and refitted. The
  B-spline field is smooth, so it is interpolated across the excluded lesion instead of
  being bent into it.
- :func:`tissue_statistics`: median and robust SD of the normal tissue, what ``tissue``
  normalisation anchors on; a lesion of a few per cent of the brain moves them far less
  than it moves the 95th percentile.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from uadct.errors import PreprocessError

MAD_TO_SD = 1.4826  # MAD of a Gaussian times this = its standard deviation
HWHM_TO_SD = 1.0 / 1.1774  # half width at half maximum of a Gaussian -> its standard deviation
OUTLIER_SDS = 3.0  # brighter than the tissue peak + this many of its SDs, or darker than the median - this many robust SDs
MIN_TISSUE_FRACTION = 0.2  # fewer tissue voxels than this share of the brain: fit under the whole mask instead
OUTLIER_SHARE = 0.25  # a shrunk voxel with more outlier voxels than this is left out of the fit
HISTOGRAM_BINS = 512
STRIPE_QUANTILE = 0.05  # half-width of the white stripe, in quantile


def normal_tissue_mask(array: np.ndarray, mask: np.ndarray, k: float = OUTLIER_SDS) -> np.ndarray:
    """``(D, H, W)`` bool: the brain voxels (``mask`` > 0) whose intensity is that of normal tissue.

    Out: voxels brighter than the brightest large tissue peak (``bright_peak`` of
    :func:`tissue_peak`: white matter on T1, grey/white matter on FLAIR) plus ``k``
    times its standard deviation (from the half width at half maximum of its bright
    side), and voxels darker
    than the brain median minus ``k`` robust SDs (1.4826 x MAD). Falls back to the whole
    mask when fewer than 20 % of the brain voxels would remain.
    """
    brain = mask > 0
    inside = array[brain]
    if inside.size == 0:
        raise PreprocessError("the brain mask is empty")
    peak = tissue_peak(array, brain)
    median = float(np.median(inside))
    spread = MAD_TO_SD * float(np.median(np.abs(inside - median)))
    upper = peak["bright_peak"] + k * peak["bright_peak_sd"]
    lower = median - k * spread
    tissue = brain & (array <= upper) & (array >= lower)
    if tissue.sum() < MIN_TISSUE_FRACTION * brain.sum():
        return brain
    return tissue


def correct_bias_field_robust(image: sitk.Image, mask: sitk.Image, shrink: int = 4, iterations: int = 50,
                              k: float = OUTLIER_SDS) -> tuple[sitk.Image, dict[str, float]]:
    """N4 fitted on normal tissue only; returns the corrected image and the excluded share of the brain.

    Two N4 fits on the grid shrunk by ``shrink``: the first under the brain mask minus
    what :func:`normal_tissue_mask` rejects on the raw scan, the second minus what it
    rejects after the first correction. A shrunk voxel is left out when more than 25 %
    of its voxels are rejected, and the rejected region is grown by one shrunk voxel
    (partial-volume rims). The last field is applied at full resolution.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    positive = sitk.GetImageFromArray(np.clip(sitk.GetArrayViewFromImage(image), 0, None) + 1.0)
    positive.CopyInformation(image)
    full = sitk.GetArrayFromImage(positive)
    brain = sitk.GetArrayViewFromImage(mask) > 0
    if not brain.any():
        raise PreprocessError("the brain mask is empty: cannot fit the bias field")
    small_image = sitk.Shrink(positive, [shrink] * 3)
    small_mask = sitk.Shrink(sitk.Cast(mask, sitk.sitkUInt8), [shrink] * 3)
    small_brain = sitk.GetArrayViewFromImage(small_mask) > 0
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([iterations] * 3)
    corrected = full
    excluded = 0.0
    log_field = None
    for _ in range(2):
        rejected = brain & ~normal_tissue_mask(corrected, brain, k)
        excluded = float(rejected.sum() / brain.sum())
        rejected_image = sitk.GetImageFromArray(rejected.astype(np.float32))
        rejected_image.CopyInformation(image)
        share = sitk.GetArrayFromImage(sitk.BinShrink(rejected_image, [shrink] * 3))
        share = share[tuple(slice(0, n) for n in small_brain.shape)]
        out = ndimage.binary_dilation(share > OUTLIER_SHARE, iterations=1)
        fit = small_brain & ~out
        if fit.sum() < MIN_TISSUE_FRACTION * small_brain.sum():
            fit = small_brain
        fit_mask = sitk.GetImageFromArray(fit.astype(np.uint8))
        fit_mask.CopyInformation(small_mask)
        corrector.Execute(small_image, fit_mask)
        log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(positive))
        corrected = full / np.exp(log_field)
    result = sitk.GetImageFromArray((corrected - 1.0).astype(np.float32))
    result.CopyInformation(image)
    return result, {"excluded_fraction": round(excluded, 4)}


def tissue_peak(array: np.ndarray, mask: np.ndarray, bins: int = HISTOGRAM_BINS,
                stripe: float = STRIPE_QUANTILE) -> dict[str, float]:
    """The dominant normal-tissue intensity of ``(D, H, W)`` ``array`` under ``mask``.

    The highest bin of the brain histogram (0.5th..99.5th percentile range, ``bins``
    bins, smoothed with a Gaussian of 2 bins), refined as the mean of the voxels whose
    quantile lies within ``stripe`` of the peak's. Returns ``peak``, ``peak_sd`` (from
    the half width at half maximum of the peak's bright side), ``stripe_sd`` (the SD of
    the stripe's voxels), ``mode`` (the bin centre), and ``bright_peak`` and
    ``bright_peak_sd``: the brightest local maximum at least half as high as the highest
    (white matter on T1 even where grey matter's peak is higher, as at 2 mm), in the
    array's units.
    """
    inside = np.asarray(array[mask > 0], dtype=np.float64)
    inside = inside[np.isfinite(inside)]
    if inside.size == 0:
        raise PreprocessError("the brain mask is empty: nothing to normalise")
    low, high = np.percentile(inside, [0.5, 99.5])
    if not high > low:
        raise PreprocessError("the brain has constant intensity: cannot normalise")
    counts, edges = np.histogram(inside, bins=bins, range=(low, high))
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), 2.0)
    mode = 0.5 * (edges[np.argmax(smooth)] + edges[np.argmax(smooth) + 1])
    ordered = np.sort(inside)
    rank = np.searchsorted(ordered, mode) / ordered.size
    lo_index = int(max(0.0, rank - stripe) * (ordered.size - 1))
    hi_index = int(min(1.0, rank + stripe) * (ordered.size - 1))
    window = ordered[lo_index:hi_index + 1]
    bin_width = edges[1] - edges[0]

    def bright_side_sd(top: int) -> float:
        above = np.nonzero(smooth[top:] < 0.5 * smooth[top])[0]
        return float(max((above[0] if above.size else smooth.size - top) * bin_width, bin_width) * HWHM_TO_SD)

    top = int(np.argmax(smooth))
    interior = smooth[1:-1]
    maxima = np.nonzero((interior >= smooth[:-2]) & (interior >= smooth[2:]) & (interior >= 0.5 * smooth[top]))[0] + 1
    bright = int(maxima.max()) if maxima.size else top
    return {"peak": float(window.mean()), "peak_sd": bright_side_sd(top), "stripe_sd": float(window.std()),
            "mode": float(mode), "bright_peak": float(0.5 * (edges[bright] + edges[bright + 1])),
            "bright_peak_sd": bright_side_sd(bright)}


def tissue_statistics(array: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Median and robust SD (1.4826 x MAD) of the normal tissue (:func:`normal_tissue_mask`) under ``mask``.

    What ``tissue`` normalisation anchors on: unlike the 5th/95th percentiles of the
    whole brain, the bulk of the normal tissue barely moves when a lesion is added.
    """
    tissue = np.asarray(array[normal_tissue_mask(array, mask)], dtype=np.float64)
    median = float(np.median(tissue))
    spread = MAD_TO_SD * float(np.median(np.abs(tissue - median)))
    if not spread > 0:
        raise PreprocessError("the normal tissue has constant intensity: cannot normalise")
    return {"tissue_median": median, "tissue_sd": spread, "tissue_voxels": int(tissue.size)}

