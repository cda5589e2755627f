"""Reading NIfTI volumes with their geometry, comparing grids, and the version record.

Arrays follow SimpleITK's order: ``(D, H, W)`` = (z, y, x) for a 3D image whose
physical geometry (spacing in mm, origin, direction) lives on the ``SimpleITK.Image``.

Most of it is one job, reading untrusted NIfTI files safely (header, affine, size and gzip
checks before any voxel is allocated); grids (same grid, grid records) and the version
record sit beside it. Writing (atomic files, NIfTI, JSON, text) is :mod:`uadct.writing`;
its names are re-exported here, where callers look.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from uadct import __version__
from uadct.errors import InputError, check_readable_file
from uadct.names import NIFTI_SUFFIXES, is_nifti, strip_nifti_suffix  # noqa: F401 (re-exported: io is where callers look)
from uadct.writing import atomic_path, json_safe, one_line, write_image, write_json, write_text  # noqa: F401 (re-exported)

MAX_VOXELS = 1024**3  # refuse volumes over ~1 G voxels before allocating
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0
DEFAULT_MAX_IMAGE_BYTES = 2 << 30  # memory one image read may take unless --max-memory allows more
MAX_IMAGE_MEMORY_ENV = "UADCT_MAX_IMAGE_MEMORY"  # bytes; set by the CLI's --max-memory


def map_sidecar_path(map_path: str | Path) -> Path:
    """The JSON ``uadct score`` writes beside a map: ``<id>.nii.gz`` -> ``<id>.json``."""
    map_path = Path(map_path)
    return map_path.with_name(strip_nifti_suffix(map_path) + ".json")


def list_niftis(folder: str | Path) -> list[Path]:
    """NIfTI files directly inside ``folder``, sorted by name; broken links and link loops
    named like NIfTI files are listed too, so they are reported like any bad input."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if is_nifti(p) and (p.is_symlink() or p.is_file()))


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings on stderr (e.g. for a 2D file) while reading; errors still raise."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def max_image_bytes() -> int:
    """Memory one image read may take: ``$UADCT_MAX_IMAGE_MEMORY`` bytes, else 2 GiB."""
    try:
        return int(os.environ[MAX_IMAGE_MEMORY_ENV])
    except (KeyError, ValueError):
        return DEFAULT_MAX_IMAGE_BYTES


def image_read_bytes(n_voxels: int, itemsize: int) -> int:
    """Peak memory of reading ``n_voxels`` stored with ``itemsize`` bytes: the stored
    array, its float32 copy, the image's own copy and a finiteness mask."""
    return int(n_voxels) * (int(itemsize) + 9)


def check_read_memory(path: Path, shape: tuple[int, ...], itemsize: int, dtype: str) -> None:
    """Refuse, from the header alone, a volume whose reading would take more than the limit."""
    needed = image_read_bytes(int(np.prod(shape, dtype=object)), itemsize)
    limit = max_image_bytes()
    if needed > limit:
        raise InputError(f"{path}: reading it would take {needed / 2**30:.2f} GiB of memory ({tuple(shape)} {dtype} voxels), "
                         f"over the {limit / 2**30:.2f} GiB limit; allow more with --max-memory (e.g. --max-memory "
                         f"{math.ceil(needed / 2**30) + 1}G)")


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

    A 2D image file (PNG/JPEG/TIFF, a DICOM image file) is read by
    :func:`uadct.images2d.read_image_2d` as a volume of one slice ``(1, H, W)``.

    A 4D file with a single volume is accepted (the last axis is dropped). Raises
    :class:`InputError` naming the file for anything that is not a usable 3D scan:
    missing file, folder, broken link, unreadable, empty, not NIfTI, header that
    disagrees with the data (truncated), 2D, multi-volume 4D, 5D+, vector or complex
    pixels, absurd voxel sizes or dimensions (checked before any allocation), sheared
    or singular affine, sform/qform disagreement, NaN/Inf, all-zero. Any real or integer
    voxel type is read with its values (and ``scl_slope``/``scl_inter``) as float32; a
    constant image is accepted (masks and maps often are).
    """
    path = Path(path)
    with quiet_itk():
        if path.is_dir():
            from uadct.dicom import is_dicom_folder, read_series

            if is_dicom_folder(path):  # a folder holding one DICOM series (uadct.dicom owns that format)
                return _check_volume(path, read_series(path), allow_empty)
        from uadct.images2d import is_image_2d_file, read_map_2d

        if is_image_2d_file(path):  # PNG/JPEG/TIFF or one DICOM image: a volume of one slice (uadct.images2d owns them)
            return _check_volume(path, read_map_2d(path), allow_empty)
        return _read_image(path, allow_empty)


def _read_image(path: Path, allow_empty: bool) -> sitk.Image:
    check_readable_file(path)
    nifti = _read_nifti_header(path) if is_nifti(path) else None
    reader = _read_header(path)
    size = reader.GetSize()
    dim = reader.GetDimension()
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{path}: expected a scalar image, found {reader.GetNumberOfComponents()} components per voxel")
    if dim == 4 and size[3] == 1:
        size = size[:3]
    elif dim != 3:
        raise InputError(f"{path}: expected a 3D volume, found {dim}D with size {tuple(size)}")
    if any(s < 2 for s in size[:2]) or size[2] < 1:  # one slice: a 2D image's prepared image or map (uadct.images2d)
        raise InputError(f"{path}: expected a 3D volume, found size {tuple(size)}")
    if int(np.prod(size)) > MAX_VOXELS:
        raise InputError(f"{path}: dimensions {tuple(size)} are too large ({np.prod(size):.3g} voxels)")
    if nifti is None:
        check_read_memory(path, tuple(size), reader.GetNumberOfComponents() * _itk_component_bytes(reader),
                          reader.GetPixelIDTypeAsString() if hasattr(reader, "GetPixelIDTypeAsString") else "")
    spacing = reader.GetSpacing()[:3]
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise InputError(f"{path}: absurd voxel size {tuple(round(s, 4) for s in spacing)} mm")
    direction = np.array(reader.GetDirection()).reshape(dim, dim)[:3, :3]
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise InputError(f"{path}: the affine is singular or not orthonormal (direction determinant {np.linalg.det(direction):.3g})")
    if nifti is not None:
        # one decompression (nibabel), geometry from ITK's header: ITK silently zero-fills
        # truncated gzip streams, so its voxel reader is not used for NIfTI
        image = sitk.GetImageFromArray(_read_nifti_voxels(path, nifti, tuple(size)))
        image.SetSpacing(spacing)
        image.SetOrigin(reader.GetOrigin()[:3])
        image.SetDirection(direction.ravel().tolist())
    else:
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"{path}: cannot read the voxel data ({_first_line(exc)})") from None
        if image.GetDimension() == 4:
            image = image[:, :, :, 0]
        image = sitk.Cast(image, sitk.sitkFloat32)
        if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
            raise InputError(f"{path}: contains NaN or Inf voxels")
    return _check_volume(path, image, allow_empty)


def _check_volume(path: Path, image: sitk.Image, allow_empty: bool) -> sitk.Image:
    """The checks every decoded volume passes: sane voxel sizes, orthonormal axes, not all zero."""
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in image.GetSpacing()):
        raise InputError(f"{path}: absurd voxel size {tuple(round(s, 4) for s in image.GetSpacing())} mm")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise InputError(f"{path}: the affine is singular or not orthonormal (direction determinant {np.linalg.det(direction):.3g})")
    if not allow_empty and not np.any(sitk.GetArrayViewFromImage(image)):
        raise InputError(f"{path}: the image is all zero")
    return image


def _itk_component_bytes(reader: sitk.ImageFileReader) -> int:
    """Bytes per stored voxel component from an ITK header (8 when unknown)."""
    try:
        return int(sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent())
    except (RuntimeError, TypeError):
        return 8


def _read_nifti_header(path: Path) -> Any:
    """Load a NIfTI header with nibabel (no voxel data) and refuse, before anything is
    allocated, headers that cannot describe a usable 3D scan or whose file is too short."""
    import nibabel as nib

    _check_raw_nifti1_header(path)  # before nibabel, which silently "fixes" some fields
    try:
        nifti = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputError(f"{path}: not a readable NIfTI image ({one_line(exc)})") from None
    if not isinstance(nifti, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a readable NIfTI image (found {type(nifti).__name__})")
    header = nifti.header
    dims = [int(d) for d in header["dim"]]
    if not 1 <= dims[0] <= 7:
        raise InputError(f"{path}: not a readable NIfTI image (header dim[0] = {dims[0]}, expected 1..7)")
    shape = dims[1 : dims[0] + 1]
    if any(d < 1 for d in shape):
        raise InputError(f"{path}: header dimensions {tuple(shape)} are not all positive (dim)")
    n_voxels = int(np.prod(shape, dtype=object))
    if n_voxels > MAX_VOXELS:
        raise InputError(f"{path}: dimensions {tuple(shape)} are too large ({float(n_voxels):.3g} voxels)")
    dtype = header.get_data_dtype()
    if dtype.fields is not None:
        raise InputError(f"{path}: expected a scalar image, found {len(dtype.fields)} components per voxel ({dtype.names})")
    if dtype.kind == "c":
        raise InputError(f"{path}: complex voxel type {dtype.name} is not supported (expected real intensities)")
    if dtype.kind not in "iufb":
        raise InputError(f"{path}: unsupported voxel type {dtype} (expected real intensities)")
    if len(shape) >= 3:
        _check_nifti_affines(path, header, shape[:3])
    offset = int(getattr(nifti.dataobj, "offset", header.get_data_offset()))  # 352 when the header says 0
    _check_nifti_data_size(path, header, offset + n_voxels * dtype.itemsize)  # streamed, never held
    check_read_memory(path, tuple(shape), dtype.itemsize, str(dtype))
    return nifti


def _check_raw_nifti1_header(path: Path) -> None:
    """Check sizeof_hdr, dim[0] and the voxel size (pixdim[1..3]) as stored in the file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read(348)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: not a readable NIfTI image ({one_line(exc)})") from None
    if len(raw) < 348:
        raise InputError(f"{path}: not a readable NIfTI image (the header holds {len(raw)} of 348 bytes)")
    sizes = {order: struct.unpack_from(order + "i", raw, 0)[0] for order in "<>"}
    if 540 in sizes.values():
        raise InputError(f"{path}: a NIfTI-2 file (sizeof_hdr 540), which uadct does not read; save it as NIfTI-1 "
                         "(e.g. nibabel: nib.Nifti1Image(img.get_fdata(), img.affine).to_filename(...))")
    order = next((order for order, value in sizes.items() if value == 348), None)
    if order is None:
        raise InputError(f"{path}: not a readable NIfTI image (sizeof_hdr is {sizes['<']}, expected 348)")
    dim0 = struct.unpack_from(order + "h", raw, 40)[0]
    if not 1 <= dim0 <= 7:
        raise InputError(f"{path}: not a readable NIfTI image (header dim[0] = {dim0}, expected 1..7)")
    zooms = struct.unpack_from(order + "3f", raw, 80)[: min(dim0, 3)]
    if not all(math.isfinite(z) and MIN_SPACING_MM <= z <= MAX_SPACING_MM for z in zooms):
        raise InputError(f"{path}: absurd voxel size {tuple(round(z, 4) for z in zooms)} mm in the header pixdim"
                         f" (expected {MIN_SPACING_MM}..{MAX_SPACING_MM} mm)")


def _check_nifti_affines(path: Path, header: Any, shape: list[int]) -> None:
    """Refuse a sheared or singular sform, and sform/qform that place the volume apart."""
    if int(header["sform_code"]) <= 0:
        return
    sform = header.get_sform()
    linear = sform[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(sform)) or np.any(norms < 1e-6):
        raise InputError(f"{path}: the sform affine is singular (a zero column: {np.round(linear, 4).tolist()})")
    cosines = linear / norms
    if np.abs(cosines.T @ cosines - np.eye(3)).max() > 1e-3:
        raise InputError(f"{path}: the sform affine is sheared (not orthonormal): {np.round(linear, 4).tolist()}")
    if int(header["qform_code"]) > 0:
        corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
        gap = np.abs(corners @ sform.T - corners @ header.get_qform().T).max()
        if not gap <= 1.0:
            raise InputError(f"{path}: the sform and qform affines disagree by {gap:.3g} mm (ambiguous orientation)")


def _check_nifti_data_size(path: Path, header: Any, expected: int) -> None:
    """Refuse a file holding fewer bytes than the header declares, without reading the
    voxel data: exact for .nii; for .nii.gz the gzip trailer is checked and only when it
    disagrees is the stream decompressed (counted, not kept)."""
    if not str(path).endswith(".gz"):
        found = path.stat().st_size
    else:
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            if struct.unpack("<I", handle.read(4))[0] == expected % 2**32:
                return
        found = _gzip_length(path, expected)
    if found < expected:
        raise InputError(f"{path}: the voxel data is truncated (the header declares {expected} bytes"
                         f" with the header, the file holds {found})")


def _gzip_length(path: Path, limit: int, chunk: int = 1 << 20) -> int:
    """Decompressed length of a gzip file, counting at most ``limit`` bytes."""
    count = 0
    try:
        with gzip.open(path, "rb") as stream:
            while count < limit and (block := stream.read(min(chunk, limit - count))):
                count += len(block)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: the voxel data is truncated or corrupt ({one_line(exc)})") from None
    return count


def _read_nifti_voxels(path: Path, nifti: Any, size: tuple[int, ...]) -> np.ndarray:
    """The voxels (scaled by scl_slope/scl_inter) as a ``(D, H, W)`` float32 array."""
    try:
        data = np.asanyarray(nifti.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputError(f"{path}: the voxel data is truncated or corrupt ({one_line(exc)})") from None
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    if data.shape != size:
        raise InputError(f"{path}: nibabel and ITK disagree on the size ({data.shape} vs {size})")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(f"{path}: contains NaN or Inf voxels")
    array = np.ascontiguousarray(data.T, dtype=np.float32)  # (x, y, z) -> (z, y, x)
    if data.dtype.itemsize > 4 and data.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{path}: voxel values beyond the float32 range")
    return array


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


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (of a DICOM folder: its series' files)."""
    if Path(path).is_dir():
        from uadct.dicom import series_sha256

        return series_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of uadct and the libraries whose behaviour shapes the outputs."""
    import importlib.metadata as metadata

    versions = {"uadct": __version__}
    for package in ("torch", "SimpleITK", "itk-elastix", "deepbet", "nnunetv2", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions

