"""File names: NIfTI and 2D image suffixes and subject ids from file names (no imports, so any module can use it)."""

from __future__ import annotations

from pathlib import Path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# 2D images (uadct.images2d reads them): PNG, JPEG, TIFF and single-file DICOM
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm")


def strip_nifti_suffix(path: str | Path) -> str:
    """Return the file name without ``.nii``/``.nii.gz`` (the subject id); a 2D image's
    suffix (``.png``, ``.jpg``, ``.tif``, ``.dcm``, any case) is stripped too."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    if is_image_2d(name):
        return name[: name.rindex(".")]
    return name


def is_nifti(path: str | Path) -> bool:
    """True when the path name ends in ``.nii`` or ``.nii.gz``."""
    return str(path).endswith(NIFTI_SUFFIXES)


def is_image_2d(path: str | Path) -> bool:
    """True when the path name ends in a 2D image suffix (PNG, JPEG, TIFF, DICOM; any case)."""
    return str(path).lower().endswith(IMAGE_2D_SUFFIXES)
