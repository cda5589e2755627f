"""File names: NIfTI suffixes and subject ids from file names (no imports, so any module can use it)."""

from __future__ import annotations

from pathlib import Path

NIFTI_SUFFIXES = (".nii.gz", ".nii")


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
