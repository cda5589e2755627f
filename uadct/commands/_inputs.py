"""Command-line inputs: scans, folders, DICOM series, BIDS datasets and ``-`` -> subjects, and option parsing.

Turns what a user typed into what the library takes (paths, :class:`SubjectInputs`, a batch
size, the memory one scan may take); the subject loops themselves are in the library.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from uadct.errors import InputError


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Scan files, folders of scans or DICOM series, and ``-`` (paths on stdin) -> a list of paths."""
    from uadct.batch import read_path_list
    from uadct.dicom import is_dicom_folder
    from uadct.io import is_nifti, list_niftis

    paths: list[Path] = []
    for item in inputs:
        if item == "-":
            paths += read_path_list()
            continue
        path = Path(item)
        if is_dicom_folder(path) and not dicom_images(path):
            paths.append(path)  # one DICOM series
        elif path.is_dir():
            paths += list_niftis(path) or images_2d(path) or dicom_children(path)
        elif is_nifti(path) or path.exists():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if not paths:
        raise InputError(f"no NIfTI files, 2D images or DICOM series found in {', '.join(inputs)}")
    return paths


def dicom_images(folder: Path) -> bool:
    """A folder of separate 2D DICOM images (X-rays, CT slides), not one series."""
    from uadct.images2d import is_dicom_image_folder

    return is_dicom_image_folder(folder)


def images_2d(folder: Path) -> list[Path]:
    """The 2D image files (PNG/JPEG/TIFF/DICOM) in a folder, else in its normal/ and abnormal/ sub-folders."""
    from uadct.images2d import list_images_2d

    found = list_images_2d(folder)
    if found:
        return found
    return [p for name in ("normal", "abnormal") if (folder / name).is_dir() for p in list_images_2d(folder / name)]


def dicom_children(folder: Path) -> list[Path]:
    """Sub-folders that hold a DICOM series (a cohort exported one series per folder)."""
    from uadct.dicom import is_dicom_folder

    return sorted(child for child in folder.iterdir() if is_dicom_folder(child))


def select_series(series_uid: Optional[str]) -> None:
    """--series-uid reaches the DICOM reader, in worker processes too, through the environment."""
    if series_uid:
        from uadct.dicom import SERIES_UID_ENV

        os.environ[SERIES_UID_ENV] = series_uid


def collect_subjects(inputs: list[str], sequences: list[str], reference: Optional[str],
                     participants: Optional[list[str]]) -> list[Any]:
    """BIDS datasets (folders with dataset_description.json), or plain files (grouped by sequence when asked)."""
    from uadct.preprocess.bids import SubjectInputs, find_bids_subjects, group_by_sequence, is_bids

    bids_roots = [item for item in inputs if item != "-" and Path(item).is_dir() and is_bids(item)]
    if bids_roots and len(bids_roots) != len(inputs):
        raise InputError("give either BIDS datasets or plain files/folders, not both")
    if bids_roots:
        return [s for root in bids_roots for s in find_bids_subjects(root, sequences or None, reference, participants)]
    if participants:
        raise InputError("--participant-label needs a BIDS dataset (a folder with dataset_description.json)")
    paths = collect_inputs(inputs)
    if sequences:
        return group_by_sequence(paths, sequences, reference)
    return [SubjectInputs.single(path) for path in paths]


def allow_image_memory(budget: int | None) -> None:
    """``--max-memory`` raises (never lowers) the memory one scan may take when read, for this
    process and its workers; :func:`uadct.cli.main` restores the previous value when the command ends."""
    from uadct.io import DEFAULT_MAX_IMAGE_BYTES, MAX_IMAGE_MEMORY_ENV

    if budget is not None and budget > DEFAULT_MAX_IMAGE_BYTES:
        os.environ[MAX_IMAGE_MEMORY_ENV] = str(budget)


def parse_batch_size(text: str) -> int | None:
    """``auto`` -> None (sized from the memory budget); else a positive integer."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"--batch-size {text!r}: expected a number of patches or auto") from None
    if value < 1:
        raise InputError(f"--batch-size {text!r}: must be at least 1")
    return value


def collect_score_inputs(inputs: list[str]) -> list[Path]:
    """What `uadct score` scores: scans, DICOM series, prepared subject folders (plain or BIDS), or ``-``."""
    from uadct.batch import read_path_list
    from uadct.dicom import is_dicom_folder
    from uadct.io import list_niftis
    from uadct.preprocess.prepared import PreparedFolder, find_prepared

    paths: list[Path] = []
    for item in inputs:
        if item == "-":
            paths += read_path_list()
        elif Path(item).is_dir() and not PreparedFolder(item).exists() and (not is_dicom_folder(item) or dicom_images(Path(item))):
            folder = Path(item)  # prepared subjects (plain or BIDS derivative), else the scans, 2D images or series in it
            paths += find_prepared(folder) or list_niftis(folder) or images_2d(folder) or dicom_children(folder)
        else:
            paths.append(Path(item))
    if not paths:
        raise InputError(f"nothing to score in {', '.join(inputs)}")
    return paths


def collect_prepared(items: list[Path]) -> list[Path]:
    """Prepared subject folders, or folders of them (plain or BIDS derivative), -> the subject folders."""
    from uadct.preprocess.prepared import PreparedFolder, find_prepared

    return [folder for item in items for folder in ([item] if PreparedFolder(item).exists() else find_prepared(item))]
