"""Inputs of a preprocessing batch: plain files, ``<subject>_<sequence>`` groups, or a BIDS dataset.

A BIDS dataset (a folder with ``dataset_description.json``) is read as
``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_<entity>-<label>...]_<suffix>.nii[.gz]``;
the suffixes are the ``--sequences`` (default ``T1w``). Its outputs form a BIDS
derivative: ``<out>/sub-<label>/[ses-<label>/]anat/`` holds
``<prefix>_space-<ATLAS>_desc-preproc_<suffix>.nii.gz`` per sequence,
``<prefix>_space-<ATLAS>_desc-brain_mask.nii.gz``, the transforms
``<prefix>_from-<reference>_to-<ATLAS>_mode-points_xfm.txt`` (native -> atlas points)
and ``<prefix>_from-<ATLAS>_to-<reference>_mode-points_xfm.txt`` (its inverse), and
uadct's ``preprocess.json``; ``<out>/dataset_description.json`` says DatasetType
``derivative`` and GeneratedBy uadct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from uadct import __version__
from uadct.errors import InputError
from uadct.io import is_nifti, strip_nifti_suffix, write_json, write_text

DESCRIPTION = "dataset_description.json"
BIDS_VERSION = "1.9.0"
DEFAULT_SEQUENCE = "T1w"
SINGLE = "image"  # the sequence name of a lone scan (no --sequences)


@dataclass
class SubjectInputs:
    """One subject's scans: ``images`` maps a sequence name to its file.

    ``folder`` is the output folder relative to the batch's output root; ``bids_prefix``
    (``sub-01_ses-02``) is set for BIDS inputs and switches to BIDS file names.
    """

    subject: str
    images: dict[str, Path]
    reference: str
    folder: Path
    bids_prefix: str | None = None
    missing: list[str] = field(default_factory=list)
    problem: str | None = None  # why this subject cannot be done (it fails alone)

    @classmethod
    def single(cls, path: str | Path) -> "SubjectInputs":
        """A lone scan: subject id and output folder from its file name."""
        path = Path(path)
        name = strip_nifti_suffix(path)
        return cls(name, {SINGLE: path}, SINGLE, Path(name))

    @property
    def reference_path(self) -> Path:
        return self.images.get(self.reference, Path(self.subject))


def is_bids(folder: str | Path) -> bool:
    """True for a folder holding ``dataset_description.json``."""
    return (Path(folder) / DESCRIPTION).is_file()


def parse_sequences(text: str | None) -> list[str]:
    """``"T1w,FLAIR"`` -> ``["T1w", "FLAIR"]`` (alphanumeric BIDS suffixes)."""
    if not text:
        return []
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9]+", name):
            raise InputError(f"--sequences: {name!r} is not a sequence name (letters and digits, e.g. T1w,FLAIR)")
    if len(set(names)) != len(names):
        raise InputError(f"--sequences {text!r}: a sequence is named twice")
    return names


def resolve_reference(sequences: list[str], reference: str | None) -> str:
    """The reference sequence: ``reference`` when given (must be one of ``sequences``), else the first."""
    if reference is None:
        return sequences[0]
    if reference not in sequences:
        raise InputError(f"--reference {reference!r} is not one of --sequences {','.join(sequences)}")
    return reference


_ENTITY = re.compile(r"^(?P<key>[a-zA-Z0-9]+)-(?P<value>[a-zA-Z0-9]+)$")


def _split_bids_name(path: Path) -> tuple[dict[str, str], str] | None:
    """``sub-01_ses-1_acq-x_T1w.nii.gz`` -> ({sub: 01, ses: 1, acq: x}, "T1w"), or None."""
    parts = strip_nifti_suffix(path).split("_")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        match = _ENTITY.match(part)
        if not match:
            return None
        entities[match["key"]] = match["value"]
    return (entities, parts[-1]) if "sub" in entities else None


def find_bids_subjects(
    root: str | Path,
    sequences: list[str] | None = None,
    reference: str | None = None,
    participants: Iterable[str] | None = None,
) -> list[SubjectInputs]:
    """Scans of a BIDS dataset grouped per subject/session (and per other entities, e.g. ``run``).

    Each group becomes one :class:`SubjectInputs` keyed by its entities without the
    suffix. A group lacking a sequence (the reference included) is listed with ``missing``
    set, groups that would share a session's output folder (two ``run-``s) with ``problem``
    set: they fail alone, the batch goes on.
    ``participants`` are labels with or without ``sub-``.
    """
    root = Path(root)
    sequences = sequences or [DEFAULT_SEQUENCE]
    reference = resolve_reference(sequences, reference)
    wanted = {p.removeprefix("sub-") for p in participants} if participants else None
    groups: dict[tuple[tuple[str, str], ...], dict[str, Path]] = {}
    for path in sorted(root.glob("sub-*/anat/*")) + sorted(root.glob("sub-*/ses-*/anat/*")):
        if not (path.is_file() and is_nifti(path)):
            continue
        parsed = _split_bids_name(path)
        if parsed is None:
            continue
        entities, suffix = parsed
        if suffix not in sequences or (wanted is not None and entities["sub"] not in wanted):
            continue
        if path.parent.parent.name != f"sub-{entities['sub']}" and path.parent.parent.name != f"ses-{entities.get('ses')}":
            continue
        key = tuple(entities.items())
        if suffix in groups.setdefault(key, {}):
            raise InputError(f"{path}: two {suffix} files for {'_'.join(f'{k}-{v}' for k, v in key)} (.nii and .nii.gz?)")
        groups[key][suffix] = path
    if wanted is not None:
        found = {dict(key)["sub"] for key in groups}
        absent = sorted(wanted - found)
        if absent:
            raise InputError(f"{root}: no {'/'.join(sequences)} scans for participant(s) {', '.join(absent)}")
    subjects = []
    for key, images in sorted(groups.items()):
        entities = dict(key)
        prefix = "_".join(f"{k}-{v}" for k, v in key)
        folder = Path(f"sub-{entities['sub']}")
        if "ses" in entities:
            folder = folder / f"ses-{entities['ses']}"
        ordered = {name: images[name] for name in sequences if name in images}
        missing = [name for name in sequences if name not in images]
        subjects.append(SubjectInputs(prefix, ordered, reference, folder / "anat", prefix, missing))
        if reference in missing:
            subjects[-1].problem = f"no {reference} scan (the reference sequence) for {prefix}"
    by_folder: dict[Path, list[SubjectInputs]] = {}
    for subject in subjects:
        by_folder.setdefault(subject.folder, []).append(subject)
    for clash in (group for group in by_folder.values() if len(group) > 1):
        for subject in clash:  # one prepared folder per session: several runs/acquisitions cannot share it
            subject.problem = (f"{len(clash)} {reference} scans for {clash[0].folder.parent} "
                               f"({', '.join(s.subject for s in clash)}); keep one per session")
    if not subjects:
        raise InputError(f"{root}: no sub-*/[ses-*/]anat/*_{reference}.nii[.gz] files in this BIDS dataset")
    return subjects


def group_by_sequence(paths: list[Path], sequences: list[str], reference: str | None = None) -> list[SubjectInputs]:
    """Plain files named ``<subject>_<sequence>.nii[.gz]`` grouped per subject.

    Files of other sequences are ignored; a subject lacking a sequence (the reference
    included) is listed with ``missing`` set and fails alone.
    """
    reference = resolve_reference(sequences, reference)
    groups: dict[str, dict[str, Path]] = {}
    for path in paths:
        name = strip_nifti_suffix(path)
        subject, _, sequence = name.rpartition("_")
        if subject and sequence in sequences:
            groups.setdefault(subject, {})[sequence] = Path(path)
    subjects = []
    for subject, images in sorted(groups.items()):
        ordered = {name: images[name] for name in sequences if name in images}
        subjects.append(SubjectInputs(subject, ordered, reference, Path(subject),
                                      missing=[name for name in sequences if name not in images]))
    if not subjects:
        raise InputError(f"no files named <subject>_<sequence>.nii.gz for sequences {','.join(sequences)}")
    return subjects


def space_label(atlas: str) -> str:
    """The BIDS ``space-`` label of an atlas: ``sri24`` -> ``SRI24``; a template file -> its alphanumeric stem."""
    name = strip_nifti_suffix(atlas) if is_nifti(atlas) else str(atlas)
    label = re.sub(r"[^A-Za-z0-9]", "", Path(name).name)
    return label.upper() if label.lower() == "sri24" else (label or "template")


def bids_file_names(prefix: str, sequences: list[str], reference: str, atlas: str) -> dict[str, object]:
    """File names of a prepared subject in the BIDS derivative layout."""
    space = space_label(atlas)
    return {
        "images": {name: f"{prefix}_space-{space}_desc-preproc_{name}.nii.gz" for name in sequences},
        "mask": f"{prefix}_space-{space}_desc-brain_mask.nii.gz",
        "subject_to_atlas": f"{prefix}_from-{reference}_to-{space}_mode-points_xfm.txt",
        "atlas_to_subject": f"{prefix}_from-{space}_to-{reference}_mode-points_xfm.txt",
        "elastix": f"{prefix}_from-{reference}_to-{space}_desc-elastix_xfm.txt",
    }


def write_derivative_description(out_dir: str | Path, source: str | Path | None = None) -> Path:
    """``<out>/dataset_description.json`` of a BIDS derivative made by uadct (and a ``.bidsignore``)."""
    out_dir = Path(out_dir)
    description = {
        "Name": "uadct preprocessing",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "uadct", "Version": __version__}],
    }
    if source is not None:
        description["SourceDatasets"] = [{"URL": Path(source).resolve().as_uri()}]
    write_text("**/preprocess.json\n**/*desc-elastix_xfm.txt\n", out_dir / ".bidsignore")
    return write_json(description, out_dir / DESCRIPTION)
