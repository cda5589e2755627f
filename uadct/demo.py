"""A deterministic demo cohort built from real anatomy: the SRI24 head T1 with skull.

Every subject is the atlas head, for test subjects with 1-3 inserted lesions, put
through a random contrast change, a random affine plus smooth elastic deformation,
a smooth bias field and Rician noise, and written on its own grid (some in another
orientation or voxel size). Test subjects get a uint8 lesion mask on exactly their
grid, and every subject a truth JSON plus an ITK ``.tfm`` of the generating transform
so registration accuracy can be measured against it.

Geometry convention: the recorded transform ``T`` maps *subject* physical points (LPS mm)
to *atlas* physical points, ``p_atlas = B(A(p_subject))`` with ``A`` the affine and ``B``
the B-spline deformation (the way ``SimpleITK.Resample`` uses it to render the subject).
The atlas-to-subject mapping is its inverse; :func:`atlas_to_subject` computes it.

Layout under ``out_dir``::

    healthy/<id>.nii.gz   test/<id>.nii.gz   labels/<id>.nii.gz (test only)
    truth/<id>.json       truth/<id>.tfm

Size: about 600 lines for one job, rendering a synthetic subject from the atlas; the
steps (deformation, lesions, contrast, bias, noise, grids) share one geometry convention
and are kept together so it is stated and used in one place.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from uadct.atlas import KNOWN_ATLASES, Atlas, load_atlas
from uadct.errors import AtlasError, InputError, SettingError
from uadct.io import array_like, atomic_path, grid_of, write_image, write_json

log = logging.getLogger(__name__)

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
BSPLINE_MESH = (5, 5, 5)
BSPLINE_PAD_MM = 30.0
MAX_LESION_DIAMETER_MM = 30.0
MIN_LESION_DIAMETER_MM = 3.0


@dataclass
class Cohort:
    """Paths of a generated cohort; lists are sorted by subject id."""

    root: Path
    healthy: list[Path]
    test: list[Path]
    labels: list[Path]
    truth: list[Path]


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


@dataclass
class RenderedSubject:
    """A rendered subject: its image, lesion mask (test only) and generating transform."""

    image: sitk.Image  # int16 on the subject grid
    label: sitk.Image | None  # uint8 on the same grid
    transform: sitk.CompositeTransform  # subject -> atlas physical points
    truth: dict[str, Any]


class DemoAnatomy:
    """The atlas head prepared once per cohort: background-free head, masks, lesion sites.

    Arrays are ``(D, H, W)`` on the atlas grid.
    """

    def __init__(self, atlas: Atlas) -> None:
        if atlas.head is None:
            raise AtlasError(f"atlas {atlas.name!r} has no head image; the demo cohort needs one (use 'sri24')")
        self.atlas = atlas
        self.grid = atlas.head
        head = sitk.GetArrayFromImage(atlas.head).astype(np.float32)
        brain = sitk.GetArrayFromImage(atlas.brain).astype(np.float32)
        self.brain_mask = sitk.GetArrayFromImage(atlas.mask) > 0
        if not self.brain_mask.any():
            raise InputError(f"atlas {atlas.name!r}: the brain mask is empty")
        self.spacing_zyx = np.array(atlas.head.GetSpacing()[::-1])
        self.wm_intensity = float(np.percentile(brain[self.brain_mask], 80))
        self.head_mask, soft, surface = self._head_mask(head)
        self.head = head * soft  # drops the atlas's faint rectangular background
        # lesion sites: parenchyma (not CSF) and the distance (mm) to the edge of the brain mask
        inside = np.argwhere(self.brain_mask)
        box = tuple(slice(max(int(a) - 4, 0), int(b) + 5) for a, b in zip(inside.min(axis=0), inside.max(axis=0)))
        smooth = ndimage.gaussian_filter(brain[box], 2.0 / self.spacing_zyx, truncate=3.0)
        self.tissue_ok = np.zeros_like(self.brain_mask)
        self.tissue_ok[box] = self.brain_mask[box] & (smooth >= 0.55 * self.wm_intensity)
        crop = sitk.GetImageFromArray(self.brain_mask[box].astype(np.uint8))
        crop.SetSpacing(atlas.head.GetSpacing())
        distance = sitk.SignedMaurerDistanceMap(crop, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
        self.brain_distance_mm = np.zeros(head.shape, np.float32)
        self.brain_distance_mm[box] = np.maximum(sitk.GetArrayFromImage(distance), 0)
        self.head_centre = self.to_physical(np.argwhere(self.head_mask).mean(axis=0))
        self.head_surface = self.to_physical(surface)  # (N, 3) mm, every 2 mm over the head's outer surface

    def _head_mask(self, head: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The head (largest bright component, holes filled, dilated ~4 mm), a soft-edged weight, and the
        (N, 3) (z, y, x) indices of its surface; made at half resolution."""
        coarse = ndimage.gaussian_filter(head[::2, ::2, ::2], 1.0)
        components, _ = ndimage.label(coarse > 0.3 * self.wm_intensity)  # above the atlas's hazy background box
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = ndimage.binary_fill_holes(components == sizes.argmax())
        mask = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])  # the neck is open at the bottom
        mask = ndimage.binary_dilation(mask, iterations=2)
        soft = np.clip(ndimage.gaussian_filter(mask.astype(np.float32), 0.75), 0.0, 1.0)
        upsample = [np.minimum(np.arange(n) // 2, m - 1) for n, m in zip(head.shape, mask.shape)]
        grid = np.ix_(*upsample)
        surface = np.argwhere(mask & ~ndimage.binary_erosion(mask)) * 2 + 0.5
        return mask[grid], soft[grid], surface

    def to_physical(self, index_zyx: np.ndarray) -> np.ndarray:
        """Physical points (N, 3) (x, y, z mm) of continuous atlas indices (N, 3) in (z, y, x) order."""
        return _index_to_physical(self.grid, np.asarray(index_zyx, dtype=float)[..., ::-1])

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous atlas indices (N, 3) in (z, y, x) order of physical points (N, 3)."""
        return _physical_to_index(self.grid, np.asarray(points, dtype=float))[..., ::-1]


def generate_cohort(
    out_dir: str | Path,
    n_healthy: int = 8,
    n_test: int = 4,
    seed: int = 0,
    atlas: Atlas | DemoAnatomy | None = None,
    voxel_scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> Cohort:
    """Write a demo cohort under ``out_dir`` and return its paths.

    Subject ``sub-h<i>`` / ``sub-t<i>`` depends only on ``seed``, its index and
    ``voxel_scale`` (not on the cohort size). ``voxel_scale`` multiplies every output
    voxel size (2.0 gives volumes of about 120x130x100 voxels). ``atlas`` defaults to SRI24; a prepared
    :class:`DemoAnatomy` may be passed too (the last one prepared is reused anyway).
    """
    if n_healthy < 0 or n_test < 0 or n_healthy + n_test == 0:
        raise SettingError(f"need at least one subject, got n_healthy={n_healthy}, n_test={n_test}")
    if not 0.25 <= voxel_scale <= 8.0:
        raise SettingError(f"voxel_scale must be within 0.25..8, got {voxel_scale}")
    anatomy = atlas if isinstance(atlas, DemoAnatomy) else _prepared(atlas if atlas is not None else load_atlas("sri24"))
    root = Path(out_dir)
    cohort = Cohort(root, [], [], [], [])
    jobs = [("healthy", i) for i in range(n_healthy)] + [("test", i) for i in range(n_test)]
    for done, (group, index) in enumerate(jobs, start=1):
        plan = plan_subject(anatomy, group, index, seed, voxel_scale)
        subject = render_subject(anatomy, plan)
        sid = plan.subject_id
        truth_dir = root / "truth"
        truth_dir.mkdir(parents=True, exist_ok=True)
        tfm = truth_dir / f"{sid}.tfm"
        _write_transform(subject.transform, tfm)
        image_path = write_image(subject.image, root / group / f"{sid}.nii.gz")
        (cohort.healthy if group == "healthy" else cohort.test).append(image_path)
        if subject.label is not None:
            cohort.labels.append(write_image(subject.label, root / "labels" / f"{sid}.nii.gz"))
        subject.truth["transform"]["file"] = tfm.name
        cohort.truth.append(write_json(subject.truth, truth_dir / f"{sid}.json"))
        log.info("demo subject %s (%s, %s, %s mm, %d lesions) written", sid, group, plan.orientation,
                 "x".join(f"{s:g}" for s in plan.spacing), len(plan.lesions))
        if progress is not None:
            progress(done, len(jobs))
    return cohort


_last_prepared: list[DemoAnatomy] = []


def _prepared(atlas: Atlas) -> DemoAnatomy:
    """The DemoAnatomy of ``atlas``, reusing the last one for the same atlas (2 s saved per cohort)."""
    for anatomy in _last_prepared:
        same_file = atlas.name in KNOWN_ATLASES and (anatomy.atlas.name, anatomy.atlas.checksum) == (atlas.name, atlas.checksum)
        if anatomy.atlas is atlas or same_file:
            return anatomy
    anatomy = DemoAnatomy(atlas)
    _last_prepared[:] = [anatomy]
    return anatomy


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


def render_subject(anatomy: DemoAnatomy, plan: SubjectPlan, with_lesions: bool = True) -> RenderedSubject:
    """Render a planned subject; ``with_lesions=False`` gives its healthy twin (same noise)."""
    head = anatomy.head.copy()
    lesions = plan.lesions if with_lesions else []
    lesion_label = np.zeros(head.shape, np.uint8) if lesions else None
    for lesion in lesions:
        _insert_lesion(anatomy, head, lesion_label, lesion)
    wm = anatomy.wm_intensity
    head = (plan.contrast_scale * wm) * np.power(head / wm, plan.gamma, dtype=np.float32)

    affine = _affine(plan, anatomy.head_centre)
    bspline = _bspline(plan, anatomy.grid)
    transform = sitk.CompositeTransform([bspline, affine])  # applies the affine first
    field_spacing = 4.0 * min(plan.spacing)
    render_transform, render_error = _fast_transform(bspline, affine, anatomy, field_spacing)
    reference = _subject_grid(plan, anatomy, affine)

    image = sitk.Resample(array_like(head, anatomy.grid), reference, render_transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array *= _bias_field(plan.bias_coefficients, array.shape)
    sigma = plan.noise_fraction * plan.contrast_scale * wm
    noise = np.random.default_rng(plan.noise_seed)
    real = array + sigma * noise.standard_normal(array.shape, dtype=np.float32)
    imaginary = sigma * noise.standard_normal(array.shape, dtype=np.float32)
    array = np.sqrt(real * real + imaginary * imaginary)
    subject = array_like(np.clip(np.rint(array), 0, np.iinfo(np.int16).max).astype(np.int16), reference)

    label = None
    label_voxels = 0
    lesion_truth: list[dict[str, Any]] = []
    if plan.group == "test":
        label_array = np.zeros(array.shape, np.uint8)
        if lesion_label is not None:
            _resample_label(anatomy, lesion_label, reference, render_transform, transform, label_array)
        label = array_like(label_array, reference)
        label_voxels = int(label_array.sum())
        for lesion in lesions:
            entry = asdict(lesion)
            entry["centre_mm_atlas"] = entry.pop("centre_mm")
            entry["centre_mm_subject"] = atlas_to_subject([lesion.centre_mm], transform)[0].tolist()
            lesion_truth.append(entry)
    truth = _truth(plan, anatomy, reference, affine, bspline, field_spacing, render_error, sigma, lesion_truth,
                   label_voxels)
    return RenderedSubject(subject, label, transform, truth)


def atlas_to_subject(points: Sequence[Sequence[float]] | np.ndarray, transform: sitk.Transform,
                     tolerance_mm: float = 1e-5, max_iterations: int = 50) -> np.ndarray:
    """Map atlas physical points (N, 3) to subject space by inverting ``transform`` (Newton).

    ``transform`` maps subject points to atlas points (the recorded generating transform).
    """
    out = []
    for target in np.asarray(points, dtype=float).reshape(-1, 3):
        x = target.copy()
        for _ in range(max_iterations):
            residual = target - np.array(transform.TransformPoint(tuple(x)))
            if np.linalg.norm(residual) < tolerance_mm:
                break
            jacobian = np.empty((3, 3))
            for axis in range(3):
                step = np.zeros(3)
                step[axis] = 0.5
                jacobian[:, axis] = (np.array(transform.TransformPoint(tuple(x + step)))
                                     - np.array(transform.TransformPoint(tuple(x - step))))
            x = x + np.linalg.solve(jacobian, residual)
        else:
            raise ValueError(f"atlas point {target.tolist()} could not be mapped to subject space")
        out.append(x)
    return np.array(out)


def read_truth_transform(path: str | Path) -> sitk.Transform:
    """The generating transform (subject -> atlas points) of a truth ``.json`` or ``.tfm``."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            truth = json.loads(path.read_text(encoding="utf-8"))
            path = path.parent / truth["transform"]["file"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: not a demo truth file ({exc})") from None
    if not path.is_file():
        raise InputError(f"{path}: transform file not found")
    return sitk.ReadTransform(str(path))


# ----------------------------------------------------------------------------- internals
def _index_to_physical(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (index_xyz * np.asarray(image.GetSpacing())) @ direction.T


def _physical_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return ((points - np.asarray(image.GetOrigin())) @ direction) / np.asarray(image.GetSpacing())


def _bias_coefficients(rng: np.random.Generator) -> list[float]:
    """Quadratic log-bias coefficients scaled so the field spans up to +-10..20 %."""
    coefficients = rng.normal(0.0, 1.0, len(BIAS_TERMS))
    u = np.linspace(-1, 1, 9)
    peak = np.abs(_bias_polynomial(coefficients, u[:, None, None], u[None, :, None], u[None, None, :])).max()
    return (coefficients * np.log(1 + rng.uniform(0.1, 0.2)) / peak).tolist()


def _bias_polynomial(c: Sequence[float], z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    return sum(ci * t for ci, t in zip(c, terms))


def _bias_field(coefficients: Sequence[float], shape: tuple[int, ...]) -> np.ndarray:
    """``exp`` of the polynomial in index coordinates scaled to [-1, 1] along each axis; (D, H, W) float32."""
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    log_bias = _bias_polynomial(coefficients, z[:, None, None], y[None, :, None], x[None, None, :])
    return np.exp(np.broadcast_to(log_bias, shape)).astype(np.float32)


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
            if any(np.linalg.norm(centre - np.array(other.centre_mm)) < reach + _reach(other) + 2.0 for other in lesions):
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


def _reach(lesion: Lesion) -> float:
    """Largest distance (mm) from the centre that a lesion can cover."""
    return lesion.diameter_mm / 2 * (1 + 1.5 * lesion.irregularity) + 1.0


def _lesion_box(anatomy: DemoAnatomy, lesion: Lesion) -> tuple[slice, ...]:
    centre = anatomy.to_index(np.array(lesion.centre_mm))
    half = np.ceil((_reach(lesion) + 4 * lesion.edge_mm) / anatomy.spacing_zyx) + 1
    lo = np.maximum(np.floor(centre - half), 0).astype(int)
    hi = np.minimum(np.ceil(centre + half) + 1, anatomy.head.shape).astype(int)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _insert_lesion(anatomy: DemoAnatomy, head: np.ndarray, label: np.ndarray, lesion: Lesion) -> None:
    """Blend a soft-edged lesion into ``head`` and mark its binary region in ``label`` (in place)."""
    box = _lesion_box(anatomy, lesion)
    shape = tuple(s.stop - s.start for s in box)
    offsets = np.stack(np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij"), axis=-1)
    centre = anatomy.to_index(np.array(lesion.centre_mm))
    distance = np.linalg.norm((offsets - centre) * anatomy.spacing_zyx, axis=-1)
    radius = np.full(shape, lesion.diameter_mm / 2)
    if lesion.shape == "blob":
        coarse = np.random.default_rng(lesion.noise_seed).standard_normal((4, 4, 4))
        smooth = ndimage.zoom(coarse, [n / 4 for n in shape], order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
        smooth = np.clip((smooth - smooth.mean()) / (smooth.std() + 1e-6), -1.5, 1.5)
        radius = radius * (1 + lesion.irregularity * smooth)
    brain = anatomy.brain_mask[box]
    weight = brain / (1 + np.exp(-(radius - distance) / lesion.edge_mm))
    tissue = head[box]
    local = ndimage.gaussian_filter(tissue * brain, 3.0 / anatomy.spacing_zyx)
    local /= np.maximum(ndimage.gaussian_filter(brain.astype(np.float32), 3.0 / anatomy.spacing_zyx), 1e-3)
    target = lesion.intensity_factor * (0.5 * tissue + 0.5 * local)
    head[box] = tissue + weight * (target - tissue)
    label[box] |= ((distance < radius) & brain).astype(np.uint8)


def _affine(plan: SubjectPlan, centre: np.ndarray) -> sitk.AffineTransform:
    """``A(x) = M (x - c) + c + t`` with ``M = Rz Ry Rx S`` about the head centre ``c``."""
    rx, ry, rz = np.deg2rad(plan.rotation_deg)
    cos, sin = np.cos, np.sin
    rot_x = np.array([[1, 0, 0], [0, cos(rx), -sin(rx)], [0, sin(rx), cos(rx)]])
    rot_y = np.array([[cos(ry), 0, sin(ry)], [0, 1, 0], [-sin(ry), 0, cos(ry)]])
    rot_z = np.array([[cos(rz), -sin(rz), 0], [sin(rz), cos(rz), 0], [0, 0, 1]])
    matrix = rot_z @ rot_y @ rot_x @ np.diag(plan.scale)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(float(c) for c in centre))
    affine.SetMatrix(tuple(matrix.ravel().tolist()))
    affine.SetTranslation(tuple(float(t) for t in plan.shift_mm))
    return affine


def _bspline_domain(grid: sitk.Image) -> sitk.Image:
    """A coarse image spanning the atlas grid plus BSPLINE_PAD_MM on every side."""
    step = 5.0
    extent = np.array(grid.GetSize()) * np.array(grid.GetSpacing()) + 2 * BSPLINE_PAD_MM
    domain = sitk.Image([int(np.ceil(e / step)) + 1 for e in extent], sitk.sitkUInt8)
    domain.SetSpacing((step,) * 3)
    domain.SetDirection(grid.GetDirection())
    corner = _index_to_physical(grid, np.full(3, -0.5)) - np.array(grid.GetDirection()).reshape(3, 3) @ np.full(3, BSPLINE_PAD_MM)
    domain.SetOrigin(tuple(corner.tolist()))
    return domain


def _bspline(plan: SubjectPlan, grid: sitk.Image) -> sitk.BSplineTransform:
    bspline = sitk.BSplineTransformInitializer(_bspline_domain(grid), list(BSPLINE_MESH), 3)
    bspline.SetParameters(plan.bspline_coefficients.ravel().tolist())
    return bspline


def _fast_transform(bspline: sitk.BSplineTransform, affine: sitk.AffineTransform, anatomy: DemoAnatomy,
                    spacing_mm: float) -> tuple[sitk.CompositeTransform, float]:
    """The composite with the B-spline sampled as a displacement field (5x faster to resample).

    Returns it and the largest deviation (mm) from the exact B-spline at ~500 points on the head.
    """
    domain = _bspline_domain(anatomy.grid)
    extent = np.array(domain.GetSize()) * np.array(domain.GetSpacing())
    size = [int(np.ceil(e / spacing_mm)) + 1 for e in extent]
    displacement = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, size, domain.GetOrigin(),
                                                     (spacing_mm,) * 3, domain.GetDirection())
    field_transform = sitk.DisplacementFieldTransform(displacement)
    error = max(np.linalg.norm(np.subtract(bspline.TransformPoint(tuple(p)), field_transform.TransformPoint(tuple(p))))
                for p in anatomy.head_surface[:: max(1, len(anatomy.head_surface) // 500)].tolist())
    return sitk.CompositeTransform([field_transform, affine]), float(error)


def _subject_grid(plan: SubjectPlan, anatomy: DemoAnatomy, affine: sitk.AffineTransform) -> sitk.Image:
    """The subject's output grid: its orientation and spacing, covering the whole transformed head."""
    inverse = affine.GetInverse()
    matrix = np.array(inverse.GetMatrix()).reshape(3, 3)
    offset = np.array(inverse.TransformPoint((0.0, 0.0, 0.0)))
    points = anatomy.head_surface @ matrix.T + offset  # ignores B: covered by the margin below
    margin = float(np.abs(plan.bspline_coefficients).max()) * np.sqrt(3) + 4.0
    direction = np.array(plan.direction).reshape(3, 3)
    along = points @ direction  # coordinates along the grid axes
    lo, hi = along.min(axis=0) - margin, along.max(axis=0) + margin
    spacing = np.array(plan.spacing)
    size = np.ceil((hi - lo) / spacing).astype(int) + 1
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing(tuple(plan.spacing))
    reference.SetDirection(tuple(plan.direction))
    reference.SetOrigin(tuple((direction @ lo).tolist()))
    return reference


def _resample_label(anatomy: DemoAnatomy, lesion_label: np.ndarray, reference: sitk.Image,
                    render_transform: sitk.Transform, exact: sitk.Transform, out: np.ndarray) -> None:
    """Resample the atlas-space lesion label onto ``reference`` (linear, > 0.5), only around the lesions."""
    found = np.argwhere(lesion_label)
    lo, hi = np.maximum(found.min(axis=0) - 2, 0), np.minimum(found.max(axis=0) + 3, lesion_label.shape)
    crop = lesion_label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    source = sitk.GetImageFromArray(crop)
    source.SetSpacing(anatomy.grid.GetSpacing())
    source.SetDirection(anatomy.grid.GetDirection())
    source.SetOrigin(tuple(anatomy.to_physical(lo.astype(float)).tolist()))
    corners_zyx = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    corners = atlas_to_subject(anatomy.to_physical(corners_zyx), exact)
    index_xyz = _physical_to_index(reference, corners)
    size = np.array(reference.GetSize())
    start = np.clip(np.floor(index_xyz.min(axis=0)) - 3, 0, size - 1).astype(int)
    stop = np.clip(np.ceil(index_xyz.max(axis=0)) + 4, 1, size).astype(int)
    target = sitk.Image([int(s) for s in stop - start], sitk.sitkFloat32)
    target.SetSpacing(reference.GetSpacing())
    target.SetDirection(reference.GetDirection())
    target.SetOrigin(reference.TransformIndexToPhysicalPoint([int(s) for s in start]))
    resampled = sitk.GetArrayFromImage(sitk.Resample(source, target, render_transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    out[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]] = resampled > 0.5


def _write_transform(transform: sitk.Transform, path: Path) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))


def _truth(plan: SubjectPlan, anatomy: DemoAnatomy, reference: sitk.Image, affine: sitk.AffineTransform,
           bspline: sitk.BSplineTransform, field_spacing: float, render_error: float, sigma: float,
           lesions: list[dict[str, Any]], label_voxels: int) -> dict[str, Any]:
    return {
        "id": plan.subject_id,
        "group": plan.group,
        "seed_key": plan.seed_key,
        "atlas": {"name": anatomy.atlas.name, "checksum": anatomy.atlas.checksum, "grid": grid_of(anatomy.grid)},
        "grid": grid_of(reference),
        "orientation": plan.orientation,
        "spacing_mm": plan.spacing,
        "transform": {
            "convention": "maps subject physical points (LPS mm) to atlas physical points: "
                          "p_atlas = B(A(p_subject)); the atlas-to-subject mapping is its inverse "
                          "(uadct.demo.atlas_to_subject). The .tfm holds the exact composite.",
            "file": None,
            "affine": {
                "definition": "A(x) = matrix @ (x - centre) + centre + translation; matrix = Rz Ry Rx diag(scale)",
                "matrix": np.array(affine.GetMatrix()).reshape(3, 3).tolist(),
                "translation": list(affine.GetTranslation()),
                "centre": list(affine.GetCenter()),
                "rotation_deg": plan.rotation_deg,
                "scale": plan.scale,
            },
            "bspline": {
                "order": 3,
                "mesh_size": list(bspline.GetTransformDomainMeshSize()),
                "domain_origin": list(bspline.GetTransformDomainOrigin()),
                "domain_physical_dimensions": list(bspline.GetTransformDomainPhysicalDimensions()),
                "domain_direction": list(bspline.GetTransformDomainDirection()),
                "coefficient_sd_mm": plan.bspline_sd_mm,
                "max_coefficient_mm": float(np.abs(plan.bspline_coefficients).max()),
                "parameters": plan.bspline_coefficients.ravel().tolist(),
            },
            "rendered_with_displacement_field_mm": field_spacing,
            "rendering_max_deviation_mm": render_error,
        },
        "intensity": {
            "definition": "I' = contrast_scale * wm * (I / wm) ** gamma on the atlas head, then bias, then Rician noise",
            "wm_intensity": anatomy.wm_intensity,
            "gamma": plan.gamma,
            "contrast_scale": plan.contrast_scale,
            "bias": {"definition": "exp(sum c_t * term_t), x, y, z = grid index scaled to [-1, 1] along i, j, k",
                     "terms": list(BIAS_TERMS), "coefficients": plan.bias_coefficients},
            "noise": {"kind": "rician", "sigma": sigma, "noise_fraction_of_wm": plan.noise_fraction},
        },
        "lesions": lesions,
        "label_voxels": label_voxels,
    }
