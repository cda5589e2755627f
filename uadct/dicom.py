"""Reading one DICOM series (MR or head CT) from a folder into a 3D volume with its geometry.

The folder's files are grouped by Series Instance UID with GDCM (SimpleITK's
``ImageSeriesReader``); a folder holding several series needs ``series_uid`` (the CLI's
``--series-uid``, or ``$UADCT_DICOM_SERIES_UID``). Geometry comes from the tags: Image
Position (Patient) and Image Orientation (Patient) of every slice, Pixel Spacing, and the
slice spacing measured between positions. Voxel values go through Rescale Slope/Intercept,
so head CT comes out in Hounsfield units (HU). Series that cannot be one regular 3D grid are
refused with one line naming the problem: gantry tilt, missing or duplicate slices, mixed
orientations or slice sizes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uadct.errors import InputError

SERIES_UID_ENV = "UADCT_DICOM_SERIES_UID"
DICOM_PREAMBLE_BYTES = 128
NOT_DICOM_SUFFIXES = (".nii", ".nii.gz", ".json", ".tfm", ".txt", ".npy", ".png", ".csv", ".md")  # skipped unread
SPACING_TOLERANCE = 0.1  # a gap more than 10 % off the median slice spacing is a missing slice
TAGS = {
    "series_uid": "0020|000e",
    "position": "0020|0032",
    "orientation": "0020|0037",
    "modality": "0008|0060",
    "description": "0008|103e",
    "tilt": "0018|1120",
    "rows": "0028|0010",
    "columns": "0028|0011",
}


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder: its UID, modality, description and file count."""

    uid: str
    modality: str
    description: str
    n_files: int

    def label(self) -> str:
        """``UID (MR, 'T1 MPRAGE', 155 files)`` for error messages and listings."""
        text = f"{self.modality or '?'}, {self.n_files} files"
        return f"{self.uid} ({text}, {self.description!r})" if self.description else f"{self.uid} ({text})"


def has_dicom_marker(path: str | Path) -> bool:
    """True when ``path`` is a file with the ``DICM`` marker after the 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(DICOM_PREAMBLE_BYTES)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder holding at least one DICOM file (the ``DICM`` marker)."""
    path = Path(path)
    if not path.is_dir():
        return False
    candidates = (p for p in path.iterdir() if not p.name.endswith(NOT_DICOM_SUFFIXES) and p.is_file())
    return any(has_dicom_marker(p) for p in candidates)


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    tag = TAGS[key]
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path}: not a readable DICOM file") from None
    return reader


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The series in ``folder`` (files directly inside it), sorted by UID."""
    folder = Path(folder)
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    found = []
    for uid in sorted(uids):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        first = _header(Path(files[0]))
        found.append(SeriesInfo(uid, _tag(first, "modality"), _tag(first, "description"), len(files)))
    return found


def choose_series(folder: str | Path, series_uid: str | None = None) -> SeriesInfo:
    """The series to read: the only one, or the one named; else a one-line error listing them."""
    folder = Path(folder)
    series = list_series(folder)
    if not series:
        raise InputError(f"{folder}: no DICOM image series found")
    if series_uid:
        for info in series:
            if info.uid == series_uid:
                return info
        raise InputError(f"{folder}: no series {series_uid}; found {'; '.join(s.label() for s in series)}")
    if len(series) > 1:
        raise InputError(f"{folder}: {len(series)} DICOM series, choose one with --series-uid: "
                         + "; ".join(s.label() for s in series))
    return series[0]


def _numbers(text: str, count: int, path: Path, what: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        values = np.array([])
    if values.size != count or not np.isfinite(values).all():
        raise InputError(f"{path}: {what} tag is missing or malformed ({text!r})")
    return values


def _sorted_slices(folder: Path, files: list[str]) -> list[str]:
    """The series' files in slice order, after checking they form one regular, untilted grid."""
    headers = [(Path(name), _header(Path(name))) for name in files]
    if len(headers) == 1:
        return files  # one (possibly multi-frame) file: GDCM reads its geometry as it is
    first_path, first = headers[0]
    orientation = _numbers(_tag(first, "orientation"), 6, first_path, "Image Orientation (Patient)")
    normal = np.cross(orientation[:3], orientation[3:])
    size = (_tag(first, "rows"), _tag(first, "columns"))
    positions = []
    for path, header in headers:
        if not np.allclose(_numbers(_tag(header, "orientation"), 6, path, "Image Orientation (Patient)"), orientation, atol=1e-4):
            raise InputError(f"{folder}: mixed slice orientations in one series ({path.name} differs from {first_path.name})")
        if (_tag(header, "rows"), _tag(header, "columns")) != size:
            raise InputError(f"{folder}: slices of different sizes in one series ({path.name})")
        tilt = _tag(header, "tilt")
        if tilt and abs(float(tilt or 0)) > 1e-3:
            raise InputError(f"{folder}: gantry tilt of {float(tilt):g} degrees; resample the series without tilt first")
        positions.append(_numbers(_tag(header, "position"), 3, path, "Image Position (Patient)"))
    positions = np.array(positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        index = int(np.argmin(steps))
        raise InputError(f"{folder}: duplicate slices at {along[index]:.2f} mm along the slice normal "
                         f"({Path(files[order[index]]).name}, {Path(files[order[index + 1]]).name})")
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(offsets).max() > 1e-2 * max(float(np.median(steps)), 1.0):
        raise InputError(f"{folder}: slice positions drift across the slice plane (gantry tilt or sheared stack); "
                         "resample the series without tilt first")
    median = float(np.median(steps))
    gaps = np.flatnonzero(np.abs(steps - median) > SPACING_TOLERANCE * median)
    if gaps.size:
        index = int(gaps[0])
        raise InputError(f"{folder}: missing or irregular slices: {steps[index]:.2f} mm gap between "
                         f"{along[index]:.2f} and {along[index + 1]:.2f} mm, {median:.2f} mm elsewhere")
    return [files[i] for i in order]


def read_series(folder: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read one series of ``folder`` as a float32 3D image (HU for CT) with its geometry from the tags.

    ``series_uid`` defaults to ``$UADCT_DICOM_SERIES_UID`` and is needed when the folder holds
    several series. Raises :class:`InputError` naming the folder and the problem.
    """
    folder = Path(folder)
    series_uid = series_uid or os.environ.get(SERIES_UID_ENV) or None
    info = choose_series(folder, series_uid)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), info.uid))
    files = _sorted_slices(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot read DICOM series {info.uid} ({str(exc).strip().splitlines()[-1]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{folder}: series {info.uid} is not greyscale ({image.GetNumberOfComponentsPerPixel()} components)")
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise InputError(f"{folder}: series {info.uid} is not a 3D volume (size {image.GetSize()})")
    return sitk.Cast(image, sitk.sitkFloat32)


def series_sha256(folder: str | Path, series_uid: str | None = None) -> str:
    """SHA-256 over the chosen series' file names and bytes (the input checksum of a DICOM folder)."""
    folder = Path(folder)
    info = choose_series(folder, series_uid or os.environ.get(SERIES_UID_ENV) or None)
    digest = hashlib.sha256()
    for name in sorted(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), info.uid)):
        digest.update(Path(name).name.encode())
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()
