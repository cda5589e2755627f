"""2D images (X-rays, CT slides, photos): reading PNG/JPEG/TIFF and 2D DICOM files, writing 2D maps.

A 2D image becomes a volume of one slice, ``(1, H, W)`` float32 (SimpleITK size
``(W, H, 1)``), so the 3D engine trains and scores it with 2D (depth-1) patches.

- **PNG, JPEG, TIFF** (Pillow): pixel spacing 1 mm, origin 0, identity direction (the files
  carry no patient geometry). 8/16-bit, integer and float greyscale are read with their
  values; colour (RGB, RGBA, palette) is converted to grey with the ITU-R 601 luma weights
  (0.299 R + 0.587 G + 0.114 B; alpha dropped) and the image carries a note saying so,
  unless its channels are equal. Multi-page TIFFs are refused.
- **DICOM** (pydicom; one single-frame image per file): the stored values go through
  Rescale Slope/Intercept (HU for CT); ``MONOCHROME1`` (bright = low values) is inverted to
  ``MONOCHROME2`` within the range the stored bits can hold after rescaling, i.e.
  ``v -> lo + hi - v`` with ``[lo, hi]`` that range; Pixel Spacing (else Imager Pixel
  Spacing, else 1 mm) is kept, and Image Position/Orientation (Patient) when present (CT
  slides). The first Window Center/Width, when present, travels as image metadata
  (:data:`WINDOW_KEY`) for ``--normalization dicom-window``.

Notes (e.g. the grey conversion) travel as image metadata (:data:`NOTES_KEY`) and end up
in the prepared subject's warnings. Maps are written (:func:`encode_image_2d`) as PNG (16-bit: ``round(65535 * value /
full_scale)`` with ``full_scale`` the map's maximum, stored in the PNG's ``uadct_full_scale``
text chunk so that reading the PNG back restores the map's units to 1/65535 of the maximum)
or TIFF (float32: the exact values; uint8 for masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from uadct.dicom import has_dicom_marker
from uadct.errors import InputError, OutputError, check_readable_file
from uadct.names import IMAGE_2D_SUFFIXES, is_image_2d

NOTES_KEY = "uadct_notes"  # image metadata: what reading changed (e.g. colour -> grey)
WINDOW_KEY = "uadct_dicom_window"  # image metadata: "center\\width" of the DICOM's first window
PNG_SCALE_KEY = "uadct_full_scale"  # PNG text chunk: the map value that 65535 stands for
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey from R, G, B
MAX_PIXELS = 1 << 28  # refuse images over ~268 M pixels before decoding
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def is_image_2d_file(path: str | Path) -> bool:
    """True when ``path`` names a 2D image file: a PNG/JPEG/TIFF/DICOM suffix, or a DICOM file of any name."""
    path = Path(path)
    return is_image_2d(path) or (not path.is_dir() and path.is_file() and not str(path).endswith((".nii", ".nii.gz"))
                                 and has_dicom_marker(path))


def list_images_2d(folder: str | Path) -> list[Path]:
    """2D image files directly inside ``folder`` (by suffix, or DICOM files of any name), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and (p.is_file() or p.is_symlink()) and is_image_2d_file(p))


def is_dicom_image_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds DICOM files that are separate 2D images (each file its own
    series, or single-frame files of X-ray modalities), not the slices of one 3D series."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    import pydicom

    files = [p for p in folder.iterdir() if p.is_file() and has_dicom_marker(p)]
    if not files:
        return False
    series = set()
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # pydicom raises many types for broken files
            return False
        if str(getattr(header, "Modality", "")) in PROJECTION_MODALITIES:
            return True
        series.add(str(getattr(header, "SeriesInstanceUID", path.name)))
    return len(series) == len(files)


PROJECTION_MODALITIES = ("CR", "DX", "MG", "RF", "XA", "IO", "PX", "RG")  # radiographs: always 2D images


def read_image_2d(path: str | Path) -> sitk.Image:
    """Read one 2D image file as a float32 volume of one slice ``(1, H, W)`` with its geometry.

    Raises :class:`InputError` naming the file for anything that is not one readable 2D
    greyscale (or colour, converted) image.
    """
    path = Path(path)
    check_readable_file(path)
    if path.suffix.lower() in RASTER_SUFFIXES and not has_dicom_marker(path):
        array, notes, extra = _read_raster(path), [], {}
        array, notes = _to_grey(path, array)
        spacing, origin, direction = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)
    else:
        array, notes, spacing, origin, direction, extra = _read_dicom(path)
    if array.ndim != 2 or min(array.shape) < 2:
        raise InputError(f"{path}: expected a 2D image of at least 2 x 2 pixels, found shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{path}: contains NaN or Inf pixels")
    image = sitk.GetImageFromArray(array[np.newaxis])
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in np.asarray(direction, dtype=np.float64).ravel()])
    if notes:
        image.SetMetaData(NOTES_KEY, "; ".join(notes))
    for key, value in extra.items():
        image.SetMetaData(key, value)
    return image


def image_notes(image: sitk.Image) -> list[str]:
    """The notes :func:`read_image_2d` attached (e.g. a colour image converted to grey)."""
    return [n for n in image.GetMetaData(NOTES_KEY).split("; ") if n] if image.HasMetaDataKey(NOTES_KEY) else []


def dicom_window(image: sitk.Image) -> tuple[float, float] | None:
    """(center, width) of the DICOM file's first window, when it had one."""
    if not image.HasMetaDataKey(WINDOW_KEY):
        return None
    center, width = (float(v) for v in image.GetMetaData(WINDOW_KEY).split("\\"))
    return center, width


def _read_raster(path: Path) -> np.ndarray:
    """PNG/JPEG/TIFF pixels: ``(H, W)`` or ``(H, W, C)`` with their stored values."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # larger images raise DecompressionBombError below
    try:
        with Image.open(path) as picture:
            if getattr(picture, "n_frames", 1) > 1:
                raise InputError(f"{path}: a multi-page image ({picture.n_frames} pages); uadct reads one 2D image per file")
            mode = picture.mode
            if mode == "P" or mode == "PA":
                picture = picture.convert("RGBA" if "transparency" in picture.info or mode == "PA" else "RGB")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                picture = picture.convert("RGB")
            elif mode == "1":
                picture = picture.convert("L")
            array = np.asarray(picture)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable PNG, JPEG or TIFF image (Pillow cannot identify it)") from None
    except Image.DecompressionBombError:
        raise InputError(f"{path}: the image is too large (over {MAX_PIXELS} pixels)") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise InputError(f"{path}: the image data is truncated or corrupt ({_one_line(exc)})") from None
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


def _to_grey(path: Path, array: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Colour ``(H, W, C)`` -> grey ``(H, W)`` (ITU-R 601 luma, alpha dropped), with a note."""
    if array.ndim == 2:
        return array, []
    channels = array.shape[2]
    if channels in (2, 4):  # grey + alpha, RGB + alpha
        array = array[..., : channels - 1]
    if array.shape[2] == 1 or all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[2])):
        return array[..., 0], []
    if array.shape[2] != 3:
        raise InputError(f"{path}: expected a greyscale or RGB image, found {channels} channels")
    grey = np.tensordot(array.astype(np.float64), np.asarray(LUMA_WEIGHTS), axes=([2], [0]))
    return grey, ["colour image converted to grey (ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B)"]


def _read_dicom(path: Path) -> tuple[np.ndarray, list[str], tuple[float, ...], tuple[float, ...], np.ndarray, dict[str, str]]:
    """A single-frame DICOM image: (pixels after rescale and MONOCHROME1 inversion, notes, spacing, origin, direction, metadata)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise InputError(f"{path}: not a readable DICOM file (no DICOM header)") from None
    except Exception as exc:  # pydicom raises many types for broken files
        raise InputError(f"{path}: not a readable DICOM file ({_one_line(exc)})") from None
    if "PixelData" not in ds:
        raise InputError(f"{path}: a DICOM file without pixel data")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(f"{path}: a multi-frame DICOM file ({frames} frames); uadct reads one 2D image per file "
                         "(give the folder of a 3D series instead)")
    rows, columns = int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))
    if rows * columns > MAX_PIXELS:
        raise InputError(f"{path}: dimensions {rows} x {columns} are too large")
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:  # missing decoders, truncated pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {syntax.name}" if syntax is not None else "pixel data"
        raise InputError(f"{path}: cannot decode the {what} ({_one_line(exc)})") from None
    notes: list[str] = []
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if stored.ndim == 3:  # RGB (pydicom converts YBR to RGB)
        stored, notes = _to_grey(path, stored)
    values, (low, high) = _rescaled(ds, stored)
    if photometric == "MONOCHROME1":
        values = low + high - values
    spacing_tag = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    row_mm, column_mm = (float(v) for v in spacing_tag) if spacing_tag and len(spacing_tag) == 2 else (1.0, 1.0)
    thickness = float(getattr(ds, "SliceThickness", 0) or 0)
    spacing = (column_mm, row_mm, thickness if 0.05 <= thickness <= 20 else 1.0)
    origin: tuple[float, ...] = (0.0, 0.0, 0.0)
    direction = np.eye(3)
    position, orientation = getattr(ds, "ImagePositionPatient", None), getattr(ds, "ImageOrientationPatient", None)
    if position is not None and orientation is not None and len(position) == 3 and len(orientation) == 6:
        row_cosines, column_cosines = np.array(orientation[:3], float), np.array(orientation[3:], float)
        normal = np.cross(row_cosines, column_cosines)
        if abs(np.linalg.norm(normal) - 1.0) < 1e-3:
            origin = tuple(float(v) for v in position)
            direction = np.stack([row_cosines, column_cosines, normal], axis=1)
    extra: dict[str, str] = {}
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        first = lambda value: float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)  # noqa: E731
        if first(width) > 0:
            extra[WINDOW_KEY] = f"{first(center):g}\\{first(width):g}"
    return values, notes, spacing, origin, direction, extra


def _rescaled(ds: object, stored: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Stored values through Rescale Slope/Intercept (float64), and the range the stored bits map to."""
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    bits = int(getattr(ds, "BitsStored", 0) or stored.dtype.itemsize * 8)
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = sorted((lowest * slope + intercept, highest * slope + intercept))
    return stored.astype(np.float64) * slope + intercept, (ends[0], ends[1])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def encode_image_2d(image: sitk.Image, path: str | Path) -> tuple[Any, str, dict[str, Any]]:
    """How a one-slice image (a map or a mask) is stored as PNG or TIFF: (Pillow image, format, save options).

    TIFF: float32 values as they are (uint8 masks as uint8). PNG: uint8 masks as they are;
    maps as 16-bit ``round(65535 * value / full_scale)`` (values below 0 become 0), with
    ``full_scale`` the map's maximum (1 when the map is <= 0), stored in the text chunk
    ``uadct_full_scale``. JPEG (lossy) and DICOM are refused. :func:`uadct.io.write_image`
    writes it atomically.
    """
    from PIL import Image, PngImagePlugin

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".tif", ".tiff"):
        raise OutputError(f"{path}: 2D maps are written as .png, .tif/.tiff or NIfTI (.nii.gz), not {suffix or 'no suffix'}")
    if image.GetDimension() != 3 or image.GetSize()[2] != 1:
        raise OutputError(f"{path}: a PNG/TIFF holds one 2D image; this one has size {image.GetSize()}; write NIfTI (.nii.gz)")
    array = sitk.GetArrayFromImage(image)[0]
    options: dict[str, Any] = {}
    if array.dtype == np.uint8:
        picture = Image.fromarray(array)
    elif suffix == ".png":
        full_scale = float(array.max()) if array.size and float(array.max()) > 0 else 1.0
        scaled = np.round(np.clip(array.astype(np.float64), 0.0, None) / full_scale * 65535.0).astype(np.uint16)
        picture = Image.fromarray(scaled)
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_SCALE_KEY, repr(full_scale))
        options["pnginfo"] = info
    else:
        picture = Image.fromarray(array.astype(np.float32))
    return picture, "PNG" if suffix == ".png" else "TIFF", options


def png_full_scale(path: str | Path) -> float | None:
    """The ``uadct_full_scale`` of a PNG map written by :func:`uadct.io.write_image` (None for other PNGs)."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            value = picture.info.get(PNG_SCALE_KEY)
    except OSError:
        return None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def read_map_2d(path: str | Path) -> sitk.Image:
    """Read a 2D file as :func:`read_image_2d`; a PNG map written by uadct gets its units back."""
    image = read_image_2d(path)
    scale = png_full_scale(path) if Path(path).suffix.lower() == ".png" else None
    if scale is not None:
        image = sitk.Cast(image * (scale / 65535.0), sitk.sitkFloat32)
    return image


__all__ = ["IMAGE_2D_SUFFIXES", "read_image_2d", "read_map_2d", "encode_image_2d", "list_images_2d", "is_image_2d_file",
           "is_dicom_image_folder", "image_notes", "dicom_window"]
