"""Reading and writing NIfTI volumes with their geometry, and atomic file writes.

Arrays follow SimpleITK's order: ``(D, H, W)`` = (z, y, x) for a 3D image whose
physical geometry (spacing in mm, origin, direction) lives on the ``SimpleITK.Image``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from uadct.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MAX_VOXELS = 1024**3  # refuse volumes over ~1 G voxels before allocating
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0


def strip_nifti_suffix(path: str | Path) -> str:
    """Return the file name without ``.nii``/``.nii.gz`` (the subject id)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: str | Path) -> bool:
    """True when the path name ends in ``.nii`` or ``.nii.gz``."""
    return str(path).endswith(NIFTI_SUFFIXES)


def list_niftis(folder: str | Path) -> list[Path]:
    """NIfTI files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _read_header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable NIfTI image ({_first_line(exc)})") from None
    return reader


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages put the useful text last ("Description: ...")
    for ln in reversed(lines):
        if ln.startswith("Description:"):
            return ln.removeprefix("Description:").strip()
    return lines[-1] if lines else type(exc).__name__


def read_image(path: str | Path, *, allow_empty: bool = False) -> sitk.Image:
    """Read a 3D scalar volume as float32, validating what can go wrong.

    A 4D file with a single volume is accepted (the last axis is dropped). Raises
    :class:`InputError` naming the file for anything that is not a usable 3D scan:
    missing file, not NIfTI, corrupt data, 2D, multi-volume 4D, vector pixels,
    absurd voxel sizes or dimensions, singular direction, NaN/Inf, all-zero.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    reader = _read_header(path)
    size = reader.GetSize()
    dim = reader.GetDimension()
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{path}: expected a scalar image, found {reader.GetNumberOfComponents()} components per voxel")
    if dim == 4 and size[3] == 1:
        size = size[:3]
    elif dim != 3:
        raise InputError(f"{path}: expected a 3D volume, found {dim}D with size {tuple(size)}")
    if any(s < 2 for s in size):
        raise InputError(f"{path}: expected a 3D volume, found size {tuple(size)}")
    if int(np.prod(size)) > MAX_VOXELS:
        raise InputError(f"{path}: dimensions {tuple(size)} are too large ({np.prod(size):.3g} voxels)")
    spacing = reader.GetSpacing()[:3]
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise InputError(f"{path}: absurd voxel size {tuple(round(s, 4) for s in spacing)} mm")
    if is_nifti(path):
        _check_nifti_voxel_data(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read the voxel data ({_first_line(exc)})") from None
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise InputError(f"{path}: the affine is singular or not orthonormal (direction determinant {np.linalg.det(direction):.3g})")
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise InputError(f"{path}: contains NaN or Inf voxels")
    if not allow_empty and not np.any(array):
        raise InputError(f"{path}: the image is all zero")
    return image


def _check_nifti_voxel_data(path: Path) -> None:
    """Read the raw voxel data once with nibabel: ITK silently zero-fills truncated
    gzip streams and maps NaN to 0, so both are caught here."""
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: the voxel data is truncated or corrupt ({reason})") from None
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(f"{path}: contains NaN or Inf voxels")


def read_mask(path: str | Path, reference: sitk.Image | None = None) -> sitk.Image:
    """Read a binary mask (any nonzero voxel is foreground) as uint8.

    When ``reference`` is given the mask must lie on the same grid.
    """
    image = read_image(path, allow_empty=True)
    mask = sitk.Cast(image != 0, sitk.sitkUInt8)
    if reference is not None and not same_grid(mask, reference):
        raise InputError(f"{path}: the mask is not on the image's grid ({grid_difference(mask, reference)})")
    return mask


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance * 100)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def grid_difference(image: sitk.Image, reference: sitk.Image) -> str:
    """Say which of size, spacing, origin and direction differ (first vs second image)."""

    def rounded(values: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(round(v, 4) for v in values)

    parts = []
    if image.GetSize() != reference.GetSize():
        parts.append(f"size {image.GetSize()} vs {reference.GetSize()}")
    if not np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4):
        parts.append(f"spacing {rounded(image.GetSpacing())} vs {rounded(reference.GetSpacing())} mm")
    if not np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-2):
        parts.append(f"origin {rounded(image.GetOrigin())} vs {rounded(reference.GetOrigin())} mm")
    if not np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4):
        orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines
        parts.append(
            f"direction {orientation(image.GetDirection())} vs {orientation(reference.GetDirection())}"
            f" {rounded(image.GetDirection())} vs {rounded(reference.GetDirection())}"
        )
    return "; ".join(parts) or "grids differ"


def array_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a ``(D, H, W)`` array as an image with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def grid_of(image: sitk.Image) -> dict[str, Any]:
    """The geometry of an image as a JSON-friendly dict."""
    return {
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def grid_image(grid: dict[str, Any]) -> sitk.Image:
    """An empty uint8 image on the grid described by :func:`grid_of`."""
    image = sitk.Image([int(s) for s in grid["size"]], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in grid["spacing"]])
    image.SetOrigin([float(s) for s in grid["origin"]])
    image.SetDirection([float(s) for s in grid["direction"]])
    return image


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place on success.

    Nothing is left at ``path`` (and no temporary file) when the block raises, so a
    killed or failed job never leaves a half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=str(path).endswith(".gz"))
    return Path(path)


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON atomically, pretty-printed."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
