"""Every random choice of a demo subject (:class:`SubjectPlan`): grid, deformation, contrast, bias, noise, lesions.

A plan depends only on the seed, the group, the subject's index and the voxel scale;
:mod:`uadct.demo.render` renders it deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from uadct.demo.anatomy import DemoAnatomy
from uadct.errors import InputError

# Output grids, cycled per group (healthy, test) by subject index: mostly the atlas
# orientation at 1 mm; index 1 is a sagittal acquisition with thick slices, so any group
# of two or more has a permuted, anisotropic grid. Spacing is in (i, j, k) order, mm.
GRID_SCHEDULE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("atlas", (1.0, 1.0, 1.0)),
    ("PIR", (1.0, 1.0, 1.5)),  # sagittal: i posterior, j inferior, k right
    ("atlas", (1.0, 1.0, 1.0)),
    ("RAS", (1.0, 1.0, 1.0)),
    ("atlas", (1.0, 1.0, 1.0)),
    ("atlas", (1.2, 1.2, 1.2)),
    ("atlas", (1.0, 1.0, 1.0)),
    ("LPS", (1.0, 1.0, 1.0)),
)
BIAS_TERMS = ("x", "y", "z", "xx", "yy", "zz", "xy", "xz", "yz")
BSPLINE_MESH = (5, 5, 5)  # control-point mesh of the deformation
MAX_LESION_DIAMETER_MM = 30.0
MIN_LESION_DIAMETER_MM = 3.0


@dataclass
class Lesion:
    """One inserted lesion, in atlas physical space (LPS mm)."""

    kind: str  # "hyper" or "hypo"
    shape: str  # "sphere" or "blob"
    centre_mm: list[float]
    diameter_mm: float
    intensity_factor: float  # relative to local tissue (half the voxel, half its 3 mm neighbourhood)
    edge_mm: float  # width of the soft (logistic) edge
    irregularity: float  # relative radius modulation of a blob (0 for a sphere)
    noise_seed: int


@dataclass
class SubjectPlan:
    """Every random choice for one subject; rendering it is deterministic."""

    subject_id: str
    group: str  # "healthy" or "test"
    seed_key: list[int]  # SeedSequence(seed, spawn_key=seed_key)
    orientation: str
    direction: list[float]
    spacing: list[float]
    rotation_deg: list[float]  # about x, y, z (applied z * y * x)
    shift_mm: list[float]
    scale: list[float]
    bspline_sd_mm: float
    bspline_coefficients: np.ndarray = field(repr=False)  # (3, nz, ny, nx) control point displacements, mm
    gamma: float = 1.0
    contrast_scale: float = 1.0
    bias_coefficients: list[float] = field(default_factory=list)  # for BIAS_TERMS
    noise_fraction: float = 0.03  # Rician sigma / white-matter intensity
    noise_seed: int = 0
    lesions: list[Lesion] = field(default_factory=list)


def plan_subject(anatomy: DemoAnatomy, group: str, index: int, seed: int, voxel_scale: float = 1.0) -> SubjectPlan:
    """Draw every random choice of subject ``index`` of ``group`` ("healthy" or "test")."""
    if group not in ("healthy", "test"):
        raise ValueError(f"group must be 'healthy' or 'test', got {group!r}")
    seed_key = [0 if group == "healthy" else 1, int(index)]
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(seed_key)))
    orientation, spacing = GRID_SCHEDULE[index % len(GRID_SCHEDULE)]
    if orientation == "atlas":
        direction = list(anatomy.grid.GetDirection())
        orientation = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(direction)
    else:
        direction = list(sitk.DICOMOrientImageFilter_GetDirectionCosinesFromOrientation(orientation))
    spacing = [s * voxel_scale for s in spacing]
    control_shape = [m + 3 for m in BSPLINE_MESH][::-1]  # (nz, ny, nx)
    sd = float(rng.uniform(1.5, 3.0))
    coefficients = np.clip(rng.normal(0.0, sd, (3, *control_shape)), -2.5 * sd, 2.5 * sd)
    coefficients[:, [0, -1], :, :] = 0.0  # no deformation at the edge of the padded domain
    coefficients[:, :, [0, -1], :] = 0.0
    coefficients[:, :, :, [0, -1]] = 0.0
    plan = SubjectPlan(
        subject_id=f"sub-{group[0]}{index:03d}",
        group=group,
        seed_key=seed_key,
        orientation=orientation,
        direction=[float(d) for d in direction],
        spacing=spacing,
        rotation_deg=rng.uniform(-10, 10, 3).tolist(),
        shift_mm=rng.uniform(-10, 10, 3).tolist(),
        scale=rng.uniform(0.95, 1.05, 3).tolist(),
        bspline_sd_mm=sd,
        bspline_coefficients=coefficients,
        gamma=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
        contrast_scale=float(rng.uniform(0.8, 1.25)),
        bias_coefficients=_bias_coefficients(rng),
        noise_fraction=float(rng.uniform(0.02, 0.04)),
        noise_seed=int(rng.integers(2**31)),
    )
    if group == "test":
        min_diameter = max(MIN_LESION_DIAMETER_MM, 3.0 * max(spacing))  # smaller would vanish on the output grid
        plan.lesions = _draw_lesions(anatomy, rng, int(rng.integers(1, 4)), min_diameter)
    return plan


def _bias_coefficients(rng: np.random.Generator) -> list[float]:
    """Quadratic log-bias coefficients scaled so the field spans up to +-10..20 %."""
    coefficients = rng.normal(0.0, 1.0, len(BIAS_TERMS))
    u = np.linspace(-1, 1, 9)
    peak = np.abs(bias_polynomial(coefficients, u[:, None, None], u[None, :, None], u[None, None, :])).max()
    return (coefficients * np.log(1 + rng.uniform(0.1, 0.2)) / peak).tolist()


def bias_polynomial(c: Sequence[float], z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    return sum(ci * t for ci, t in zip(c, terms))


def _draw_lesions(anatomy: DemoAnatomy, rng: np.random.Generator, count: int, min_diameter: float) -> list[Lesion]:
    lesions: list[Lesion] = []
    for _ in range(count):
        for _attempt in range(100):
            diameter = float(np.exp(rng.uniform(np.log(min_diameter), np.log(MAX_LESION_DIAMETER_MM))))
            shape = "blob" if rng.random() < 0.5 else "sphere"
            irregularity = float(rng.uniform(0.15, 0.35)) if shape == "blob" else 0.0
            reach = diameter / 2 * (1 + 1.5 * irregularity) + 1.0
            candidates = np.flatnonzero(anatomy.tissue_ok & (anatomy.brain_distance_mm >= reach))
            if candidates.size == 0:
                continue
            centre = anatomy.to_physical(np.array(np.unravel_index(rng.choice(candidates), anatomy.head.shape)))
            if any(np.linalg.norm(centre - np.array(other.centre_mm)) < reach + lesion_reach(other) + 2.0 for other in lesions):
                continue
            hyper = bool(rng.random() < 0.5)
            lesions.append(Lesion(
                kind="hyper" if hyper else "hypo",
                shape=shape,
                centre_mm=centre.tolist(),
                diameter_mm=diameter,
                intensity_factor=float(rng.uniform(1.6, 2.2) if hyper else rng.uniform(0.2, 0.5)),
                edge_mm=0.5 + 0.03 * diameter,
                irregularity=irregularity,
                noise_seed=int(rng.integers(2**31)),
            ))
            break
    if not lesions:
        raise InputError(f"atlas {anatomy.atlas.name!r}: no room for a lesion inside the brain mask")
    return lesions


def lesion_reach(lesion: Lesion) -> float:
    """Largest distance (mm) from the centre that a lesion can cover."""
    return lesion.diameter_mm / 2 * (1 + 1.5 * lesion.irregularity) + 1.0
