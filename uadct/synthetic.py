"""Synthetic disk lesions for detection benchmarks (the toy images of Madzia-Madzou & Kuijf 2022).

The Progressive GANomaly paper tests detectors on healthy MOOD brains into which a disk
(a cylinder: the same circle on consecutive axial slices) is inserted: 35 mm across over
50 axial slices at intensities 0.1 ... 1.0, and 1 ... 10 mm across at intensity 1.0.
Voxel AUROC is computed inside the brain only.

Volumes are prepared ``(D, H, W)`` arrays on the atlas grid (axis 0 = axial slices),
``spacing_zyx`` in mm. A disk is the set of voxels whose centre lies within the radius
(in mm, in-plane) of the disk's axis; the axis passes through a voxel centre when the
diameter is an odd number of voxels and through a voxel corner when it is even, so a
disk ``n`` voxels across spans exactly ``n`` voxels along each in-plane axis. Only
brain voxels (``mask > 0``) are changed, and they are set to the intensity exactly.

Intensities on the paper's scale: the paper's MOOD images put grey matter at about
0.2-0.3 and white matter at 0.4-0.5 on [0, 1], whereas a T1 normalised with the 5th/95th
brain percentiles to 0/1 has white matter near 1. :func:`paper_to_normalised` maps a
paper intensity linearly through two tissue anchors (GM 0.25 and WM 0.45 on the paper's
scale to this subject's GM and WM means, from :func:`uadct.augment.fit_tissue_gmm`), so
a disk of "intensity 0.5" is as bright relative to white matter as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import signal

from uadct.augment import fit_tissue_gmm
from uadct.errors import UadctError

PAPER_GREY_MATTER = 0.25  # grey matter on the paper's [0, 1] scale ("roughly 0.2 and 0.3")
PAPER_WHITE_MATTER = 0.45  # white matter on the paper's scale ("between 0.4 and 0.5")
PAPER_INTENSITIES = tuple(round(0.1 * i, 1) for i in range(1, 11))  # the intensity test, 35 mm disk
PAPER_DIAMETERS_MM = tuple(float(d) for d in range(1, 11))  # the size test, intensity 1.0
PAPER_INTENSITY_DIAMETER_MM = 35.0
PAPER_SIZE_INTENSITY = 1.0
PAPER_SLICES = 50


@dataclass(frozen=True)
class DiskPlacement:
    """Where a disk goes: its axis through (``centre_y``, ``centre_x``) (continuous voxel
    indices, ``.5`` = a voxel corner) on axial slices ``first_slice ... first_slice + n_slices - 1``."""

    first_slice: int
    n_slices: int
    centre_y: float
    centre_x: float
    diameter_mm: float
    inside_fraction: float  # of the disk's voxels that lie in the brain mask


def disk_offsets(diameter_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """In-plane voxel offsets ``(N, 2)`` (dy, dx) of a disk relative to the voxel holding its axis.

    The axis sits at a voxel centre along an axis where the diameter is an odd number of
    voxels and at the following voxel corner where it is even.
    """
    if not diameter_mm > 0:
        raise UadctError(f"disk diameter must be positive, got {diameter_mm} mm")
    radius = diameter_mm / 2.0
    shifts = [_axis_shift(diameter_mm, s) for s in spacing_yx]
    reach = [int(math.ceil(radius / s)) + 1 for s in spacing_yx]
    dy, dx = np.meshgrid(np.arange(-reach[0], reach[0] + 1), np.arange(-reach[1], reach[1] + 1), indexing="ij")
    distance = np.hypot((dy - shifts[0]) * spacing_yx[0], (dx - shifts[1]) * spacing_yx[1])
    inside = distance <= radius + 1e-9
    return np.stack([dy[inside], dx[inside]], axis=1)


def _axis_shift(diameter_mm: float, spacing: float) -> float:
    """0.0 when the diameter is an odd number of voxels along this axis, 0.5 when even."""
    voxels = max(1, int(round(diameter_mm / spacing)))
    return 0.0 if voxels % 2 else 0.5


def resize_disk(placement: DiskPlacement, diameter_mm: float, spacing_yx: tuple[float, float]) -> DiskPlacement:
    """The same disk axis voxel and slices with another diameter (the size test keeps the position)."""
    y, x = math.floor(placement.centre_y), math.floor(placement.centre_x)
    return replace(placement, diameter_mm=float(diameter_mm), centre_y=y + _axis_shift(diameter_mm, spacing_yx[0]),
                   centre_x=x + _axis_shift(diameter_mm, spacing_yx[1]), inside_fraction=math.nan)


def disk_mask(shape: tuple[int, int, int], placement: DiskPlacement, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """The disk of ``placement`` as a ``(D, H, W)`` bool array (not yet cut to the brain)."""
    offsets = disk_offsets(placement.diameter_mm, (spacing_zyx[1], spacing_zyx[2]))
    y = int(math.floor(placement.centre_y)) + offsets[:, 0]
    x = int(math.floor(placement.centre_x)) + offsets[:, 1]
    keep = (y >= 0) & (y < shape[1]) & (x >= 0) & (x < shape[2])
    out = np.zeros(shape, bool)
    z0 = max(0, placement.first_slice)
    z1 = min(shape[0], placement.first_slice + placement.n_slices)
    out[z0:z1, y[keep], x[keep]] = True
    return out


def place_disk(
    mask: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    diameter_mm: float,
    n_slices: int = PAPER_SLICES,
    seed: int = 0,
    min_inside: float = 0.98,
) -> DiskPlacement:
    """Choose, with ``seed``, where a disk lies (almost) wholly inside the brain ``mask``.

    For every possible position the fraction of the disk's voxels inside the mask is
    computed (an FFT convolution in-plane, a running sum over slices); the position is
    drawn uniformly among those with at least ``min_inside`` of the disk in the brain, or,
    when no position reaches it, among those with the largest fraction.
    """
    mask = np.asarray(mask) > 0
    if mask.ndim != 3:
        raise UadctError(f"the brain mask must be a 3D (D, H, W) array, got shape {mask.shape}")
    if not 1 <= n_slices <= mask.shape[0]:
        raise UadctError(f"a disk over {n_slices} slices does not fit a volume of {mask.shape[0]} slices")
    if not mask.any():
        raise UadctError("the brain mask is empty: nowhere to put a disk")
    offsets = disk_offsets(diameter_mm, (spacing_zyx[1], spacing_zyx[2]))
    reach = np.abs(offsets).max(axis=0) + 1
    kernel = np.zeros((2 * reach[0] + 1, 2 * reach[1] + 1), np.float32)
    kernel[offsets[:, 0] + reach[0], offsets[:, 1] + reach[1]] = 1.0
    # in-plane count of brain voxels under the disk centred on each voxel (correlation = flipped convolution)
    per_slice = signal.fftconvolve(mask.astype(np.float32), kernel[None, ::-1, ::-1], mode="same", axes=(1, 2))
    # sum over the n_slices slices starting at each slice
    cumulative = np.concatenate([np.zeros((1,) + mask.shape[1:], np.float64), np.cumsum(per_slice, axis=0, dtype=np.float64)])
    counts = cumulative[n_slices:] - cumulative[:-n_slices]
    fraction = np.rint(counts) / (len(offsets) * n_slices)
    best = float(fraction.max())
    threshold = min_inside if best >= min_inside else best - 1e-9
    candidates = np.argwhere(fraction >= threshold)
    z, y, x = candidates[np.random.default_rng(seed).integers(len(candidates))]
    shift_y, shift_x = (_axis_shift(diameter_mm, s) for s in spacing_zyx[1:])
    return DiskPlacement(int(z), int(n_slices), float(y) + shift_y, float(x) + shift_x, float(diameter_mm),
                         float(fraction[z, y, x]))


def insert_disk(
    image: np.ndarray,
    mask: np.ndarray,
    placement: DiskPlacement,
    intensity: float,
    spacing_zyx: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` with the disk's brain voxels set to ``intensity``, and the lesion mask.

    Returns ``(volume, lesion)``: ``(D, H, W)`` float32 and bool; ``lesion`` is the disk
    cut to ``mask > 0``; voxels outside the brain are left unchanged.
    """
    image = np.asarray(image)
    if image.shape != np.shape(mask):
        raise UadctError(f"image shape {image.shape} and mask shape {np.shape(mask)} differ; expected the same grid")
    lesion = disk_mask(image.shape, placement, spacing_zyx) & (np.asarray(mask) > 0)
    volume = image.astype(np.float32, copy=True)
    volume[lesion] = np.float32(intensity)
    return volume, lesion


def insert_random_disk(
    image: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    diameter_mm: float,
    intensity: float,
    n_slices: int = PAPER_SLICES,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`place_disk` then :func:`insert_disk`: ``(volume, lesion)`` for one seeded disk."""
    placement = place_disk(mask, spacing_zyx, diameter_mm, n_slices, seed)
    return insert_disk(image, mask, placement, intensity, spacing_zyx)


@dataclass(frozen=True)
class TissueAnchors:
    """Grey- and white-matter mean intensities of one subject (its normalised units)."""

    grey_matter: float
    white_matter: float


def tissue_anchors(image: np.ndarray, mask: np.ndarray, seed: int = 0) -> TissueAnchors:
    """GM and WM means from a 3-class (CSF < GM < WM) Gaussian mixture of the brain intensities.

    Meant for T1-weighted volumes, where white matter is the brightest class.
    """
    tissue = fit_tissue_gmm(image, mask, n_classes=3, seed=seed)
    grey, white = float(tissue.means[1]), float(tissue.means[2])
    if not white > grey:
        raise UadctError(f"white matter ({white:.3g}) is not brighter than grey matter ({grey:.3g}); not a T1-like contrast")
    return TissueAnchors(grey, white)


def paper_to_normalised(intensity: float, anchors: TissueAnchors) -> float:
    """A disk intensity on the paper's scale (GM 0.25, WM 0.45) in this subject's units.

    Linear through the two anchors: 0.25 -> grey matter mean, 0.45 -> white matter mean.
    """
    slope = (anchors.white_matter - anchors.grey_matter) / (PAPER_WHITE_MATTER - PAPER_GREY_MATTER)
    return float(anchors.grey_matter + (intensity - PAPER_GREY_MATTER) * slope)

