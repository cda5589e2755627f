"""Seeded synthetic lesions for real scans: irregular, soft-edged, textured, hyper- or hypo-intense.

:func:`insert_lesions` blends 1-3 lesions (3-30 mm across, log-uniform) into a scan on its
own grid (any spacing and orientation: sizes are in mm along the array axes' spacings),
inside a given brain mask, and returns the lesioned array, a binary label on the same grid
and a description of each lesion. A lesion's region is an irregular ball: its radius is
modulated by a smooth random field (``irregularity``); its weight falls off
logistically across ``edge_mm``; its target intensity is a brain-intensity quantile
(bright: above the brightest tissue; dark: CSF-like) times a smooth texture, and the
voxels become ``x + weight (target - x)``. The label is the region where the weight is at
least one half, inside the brain. The same seed gives the same lesions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from uadct.errors import UadctError

MIN_DIAMETER_MM = 3.0
MAX_DIAMETER_MM = 30.0


@dataclass(frozen=True)
class LesionSpec:
    """One lesion on the array grid: centre (voxel indices ``z, y, x``) and appearance."""

    centre: tuple[int, int, int]
    diameter_mm: float
    kind: str  # "hyper" or "hypo"
    target_quantile: float  # brain-intensity quantile the lesion takes (times ``target_factor``)
    target_factor: float
    irregularity: float  # relative radius modulation (0: a ball)
    edge_mm: float  # logistic edge width
    texture: float  # relative amplitude of the smooth intensity texture
    seed: int  # of the shape and texture fields


def draw_lesions(brain: np.ndarray, spacing_zyx: tuple[float, float, float], rng: np.random.Generator,
                 count: int | None = None, kinds: tuple[str, ...] = ("hyper", "hypo"),
                 diameters_mm: tuple[float, float] = (MIN_DIAMETER_MM, MAX_DIAMETER_MM)) -> list[LesionSpec]:
    """1-3 (or ``count``) non-overlapping lesions whose extent lies inside ``brain`` (> 0)."""
    brain = np.asarray(brain) > 0
    if not brain.any():
        raise UadctError("no brain voxel to put a lesion in")
    spacing = np.asarray(spacing_zyx, np.float64)
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)  # mm to the edge of the brain
    count = int(rng.integers(1, 4)) if count is None else count
    lesions: list[LesionSpec] = []
    for _ in range(count):
        for _attempt in range(200):
            diameter = float(np.exp(rng.uniform(np.log(diameters_mm[0]), np.log(diameters_mm[1]))))
            irregularity = float(rng.uniform(0.1, 0.35))
            reach = lesion_reach(diameter, irregularity)
            candidates = np.flatnonzero(depth >= min(reach + 2.0, depth.max()))
            if candidates.size == 0:
                continue
            centre = np.unravel_index(int(rng.choice(candidates)), brain.shape)
            if any(np.linalg.norm((np.subtract(centre, other.centre)) * spacing)
                   < reach + lesion_reach(other.diameter_mm, other.irregularity) + 2.0 for other in lesions):
                continue
            kind = str(rng.choice(kinds))
            lesions.append(LesionSpec(
                centre=tuple(int(c) for c in centre), diameter_mm=diameter, kind=kind,
                target_quantile=float(rng.uniform(0.97, 0.995) if kind == "hyper" else rng.uniform(0.01, 0.05)),
                target_factor=float(rng.uniform(1.1, 1.4) if kind == "hyper" else rng.uniform(0.6, 1.0)),
                irregularity=irregularity, edge_mm=float(0.5 + 0.04 * diameter), texture=float(rng.uniform(0.05, 0.15)),
                seed=int(rng.integers(2**31)),
            ))
            break
    if not lesions:
        raise UadctError("no room for a lesion inside the brain mask")
    return lesions


def lesion_reach(diameter_mm: float, irregularity: float) -> float:
    """Largest distance (mm) from the centre that a lesion's region can reach."""
    return diameter_mm / 2 * (1 + 1.5 * irregularity) + 1.0


def insert_lesions(image: np.ndarray, brain: np.ndarray, spacing_zyx: tuple[float, float, float],
                   lesions: list[LesionSpec]) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (any dtype) with ``lesions`` blended in, as float32, and the uint8 label."""
    out = np.asarray(image, np.float32).copy()
    brain = np.asarray(brain) > 0
    label = np.zeros(out.shape, np.uint8)
    values = out[brain]
    spacing = np.asarray(spacing_zyx, np.float64)
    for lesion in lesions:
        rng = np.random.default_rng(lesion.seed)
        half = np.ceil((lesion_reach(lesion.diameter_mm, lesion.irregularity) + 4 * lesion.edge_mm) / spacing).astype(int) + 1
        lo = np.maximum(np.asarray(lesion.centre) - half, 0)
        hi = np.minimum(np.asarray(lesion.centre) + half + 1, out.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        shape = tuple(int(b - a) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij"), axis=-1)
        distance = np.linalg.norm((grid - np.asarray(lesion.centre)) * spacing, axis=-1)
        radius = lesion.diameter_mm / 2 * (1 + lesion.irregularity * _smooth_field(rng, shape, 4))
        weight = brain[box] / (1 + np.exp(-(radius - distance) / lesion.edge_mm))
        target = float(np.quantile(values, lesion.target_quantile)) * lesion.target_factor
        target = target * (1 + lesion.texture * _smooth_field(rng, shape, 8))
        out[box] = out[box] + weight * (target - out[box])
        label[box] |= ((weight >= 0.5) & brain[box]).astype(np.uint8)
    return out, label


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int) -> np.ndarray:
    """A smooth random field on ``shape``, zero mean, unit spread, clipped to +-1.5."""
    field = ndimage.zoom(rng.standard_normal((coarse,) * 3), [n / coarse for n in shape], order=3, mode="nearest")
    field = field[: shape[0], : shape[1], : shape[2]]
    return np.clip((field - field.mean()) / (field.std() + 1e-6), -1.5, 1.5)


def describe(lesions: list[LesionSpec]) -> list[dict[str, Any]]:
    """The lesions as JSON-ready dicts."""
    return [asdict(lesion) for lesion in lesions]
