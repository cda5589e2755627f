"""The prepared subject: in memory (:class:`PreparedSubject`) and on disk (:class:`PreparedFolder`).

This module owns the prepared-folder format. A prepared subject is a folder
``<out>/<id>/`` holding ``image.nii.gz`` (float32, atlas grid; the reference sequence),
``image-<sequence>.nii.gz`` for other sequences, ``mask.nii.gz`` (uint8),
``atlas_to_subject.tfm`` (SimpleITK affine: atlas points -> subject points, what
resampling onto the atlas grid uses), ``subject_to_atlas.tfm`` (its inverse),
``elastix_transform.txt`` and ``preprocess.json`` (inputs and checksums, versions, every
parameter, timings, quality figures, warnings, the native grid, and the file names above
under ``files``). BIDS inputs get BIDS derivative names instead (see
:mod:`uadct.preprocess.bids`); every reader goes through the sidecar's ``files``, so
both layouts work everywhere. The folder is built under a temporary name and renamed
into place, so it is complete or absent.

``<subject>/cache/`` holds memory-mappable copies of the image and mask for training
(``image.npy``, ``mask.npy``, ``cache.json``; see :meth:`PreparedFolder.cached_arrays`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from uadct.augment import TissueModel, fit_tissue_gmm
from uadct.errors import InputError
from uadct.io import atomic_path, grid_image, read_image, write_image, write_json
from uadct.outputs import folder_mode, write_failure
from uadct.preprocess.bids import SINGLE, SubjectInputs, bids_file_names
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.register import load_affine, save_transform

log = logging.getLogger(__name__)

SIDECAR = "preprocess.json"
CACHE_DIR = "cache"  # inside each prepared subject folder: memory-mappable arrays and tissue model
CACHE_VERSION = 1

LEGACY_FILES: dict[str, Any] = {
    "images": {SINGLE: "image.nii.gz"},
    "mask": "mask.nii.gz",
    "atlas_to_subject": "atlas_to_subject.tfm",
    "subject_to_atlas": "subject_to_atlas.tfm",
    "elastix": "elastix_transform.txt",
}


@dataclass
class PreparedSubject:
    """One subject on the atlas grid, with what is needed to go back to its own grid.

    The one subject type of the chain: :func:`uadct.preprocess.chain.run_preprocessing`
    returns it (``sidecar`` empty) and :meth:`PreparedFolder.load` reads it back
    (``sidecar`` the folder's ``preprocess.json``). ``image`` float32, normalised,
    background 0 (the reference sequence, or ``sequence``); ``mask`` uint8 on the atlas
    grid; ``others``: other sequences on the same grid (chain output only).
    """

    image: sitk.Image
    mask: sitk.Image
    atlas_to_subject: sitk.AffineTransform
    native_grid: dict[str, Any]
    subject: str = ""
    sequence: str = SINGLE
    sidecar: dict[str, Any] = field(default_factory=dict)
    subject_to_atlas: sitk.AffineTransform | None = None  # the inverse; computed when not stored
    parameter_text: str = ""
    normalization_stats: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    others: dict[str, sitk.Image] = field(default_factory=dict)
    other_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    resolution: dict[str, Any] = field(default_factory=dict)  # input voxel size, blur, effective resolution (mm)

    def __post_init__(self) -> None:
        if self.subject_to_atlas is None:
            self.subject_to_atlas = sitk.AffineTransform(self.atlas_to_subject.GetInverse())

    @property
    def native_reference(self) -> sitk.Image:
        """An empty image on the subject's own grid (for resampling maps back)."""
        return grid_image(self.native_grid)

    @property
    def sequences(self) -> list[str]:
        """The sequences prepared for this subject (reference first)."""
        if self.sidecar:
            return list(self.sidecar.get("files", LEGACY_FILES)["images"])
        return [self.sequence, *self.others]


def file_names(inputs: SubjectInputs, config: PreprocessConfig) -> dict[str, Any]:
    """The names of a prepared subject's files: BIDS derivative names for BIDS inputs, else ``image.nii.gz`` & co."""
    sequences = list(inputs.images)
    if inputs.bids_prefix is not None:
        return bids_file_names(inputs.bids_prefix, sequences, inputs.reference, config.atlas)
    names = dict(LEGACY_FILES)
    names["images"] = {name: "image.nii.gz" if name == inputs.reference else f"image-{name}.nii.gz" for name in sequences}
    return names


class PreparedFolder:
    """A prepared subject folder on disk: its sidecar, its files (plain or BIDS names) and its array cache.

    Reading is lazy: constructing one touches nothing; :attr:`sidecar` reads
    ``preprocess.json`` once (an :class:`InputError` naming the folder when it is missing
    or corrupt).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"PreparedFolder({str(self.path)!r})"

    @property
    def sidecar_path(self) -> Path:
        return self.path / SIDECAR

    def exists(self) -> bool:
        """Whether the folder has a sidecar (the last file written, so the folder is complete)."""
        return self.sidecar_path.is_file()

    @cached_property
    def sidecar(self) -> dict[str, Any]:
        """The parsed ``preprocess.json``."""
        try:
            return json.loads(self.sidecar_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{self.path}: not a prepared subject folder (no {SIDECAR}); run `uadct preprocess` first") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.sidecar_path}: unreadable or corrupt JSON ({type(exc).__name__})") from None

    @property
    def name(self) -> str:
        """The folder's id (:func:`prepared_name`)."""
        return prepared_name(self.path)

    @property
    def subject(self) -> str:
        return self.sidecar.get("subject", self.path.name)

    @property
    def files(self) -> dict[str, Any]:
        """File names by role (``images`` by sequence, ``mask``, the transforms, ``elastix``)."""
        return self.sidecar.get("files", LEGACY_FILES)

    @property
    def reference(self) -> str:
        return self.sidecar.get("reference", SINGLE)

    @property
    def config(self) -> dict[str, Any]:
        """The preprocessing parameters as recorded (see :class:`PreprocessConfig`)."""
        return self.sidecar.get("config", {})

    @property
    def signature(self) -> dict[str, Any]:
        """What must agree between subjects trained together: parameters and atlas."""
        return {"config": self.sidecar.get("config"), "atlas": self.sidecar.get("atlas")}

    @property
    def input_sha256(self) -> str | None:
        return self.sidecar.get("input", {}).get("sha256")

    def image_path(self, sequence: str | None = None) -> Path:
        """The prepared image of ``sequence`` (default: the reference)."""
        sequence = sequence or self.reference
        if sequence not in self.files["images"]:
            raise InputError(f"{self.path}: no sequence {sequence!r}; it has {', '.join(self.files['images'])}")
        return self.path / self.files["images"][sequence]

    @property
    def mask_path(self) -> Path:
        return self.path / self.files["mask"]

    def is_complete(self, config: PreprocessConfig, input_sha256: str | dict[str, str] | None = None) -> bool:
        """True when complete and made with the same parameters and inputs.

        ``input_sha256``: the reference scan's checksum, or sequence -> checksum.
        """
        try:
            data = self.sidecar
            if PreprocessConfig.from_dict(data.get("config", {})) != config:
                return False
        except (InputError, TypeError):
            return False
        recorded = {name: entry.get("sha256") for name, entry in data.get("inputs", {}).items()}
        if not recorded:  # format 1: one input
            recorded = {data.get("reference", SINGLE): data.get("input", {}).get("sha256")}
        if isinstance(input_sha256, str) and data.get("input", {}).get("sha256") != input_sha256:
            return False
        if isinstance(input_sha256, dict) and recorded != input_sha256:
            return False
        files = data.get("files", LEGACY_FILES)
        required = _listed_files(files)
        if "files" not in data:  # format 1 had no stored inverse (load computes it)
            required.remove(LEGACY_FILES["subject_to_atlas"])
        return all((self.path / name).is_file() for name in required)

    def load(self, sequence: str | None = None) -> PreparedSubject:
        """Read the subject back; ``sequence`` picks one (default: the reference)."""
        sequence = sequence or self.reference
        image = read_image(self.image_path(sequence))
        mask = read_image(self.mask_path, allow_empty=True)
        mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
        transform = load_affine(self.path / self.files["atlas_to_subject"])
        inverse_path = self.path / self.files["subject_to_atlas"]
        inverse = load_affine(inverse_path) if inverse_path.is_file() else None
        return PreparedSubject(image, mask, transform, self.sidecar["native_grid"], subject=self.subject,
                               sequence=sequence, sidecar=self.sidecar, subject_to_atlas=inverse)

    def _source_stamp(self) -> dict[str, list[int]]:
        """Size and modification time (ns) of the prepared NIfTI files the cache is made from."""
        stamp = {}
        for path in (self.image_path(), self.mask_path):
            try:
                info = path.stat()
            except OSError:
                raise InputError(f"{path}: missing from the prepared subject folder; run `uadct preprocess` again") from None
            stamp[path.name] = [info.st_size, info.st_mtime_ns]
        return stamp

    def cached_arrays(self, tissue_model: bool = False) -> tuple[np.ndarray, np.ndarray, Path | None, TissueModel | None]:
        """The image ``(D, H, W)`` float32 and mask (uint8) as read-only memory maps, the cache folder and the tissue model.

        The arrays are cached as ``<subject>/cache/image.npy`` and ``mask.npy``, written
        atomically and described by ``cache/cache.json`` (which also keeps the tissue
        model once fitted), written last and naming the size and modification time of
        the NIfTI files they come from: a cache whose sources changed, or whose arrays do
        not have the recorded shape, is rebuilt. When the folder is read-only the arrays
        are kept in memory instead (returned cache folder ``None``).
        """
        cache = self.path / CACHE_DIR
        stamp = self._source_stamp()
        meta_path = cache / "cache.json"
        meta: dict[str, Any] = {}
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        image = mask = None
        if meta.get("version") == CACHE_VERSION and meta.get("sources") == stamp:
            try:
                image = np.load(cache / "image.npy", mmap_mode="r")
                mask = np.load(cache / "mask.npy", mmap_mode="r")
                if list(image.shape) != meta["shape"] or image.shape != mask.shape or image.dtype != np.float32:
                    image = mask = None
            except (OSError, ValueError, KeyError):
                image = mask = None
        writable = True
        if image is None or mask is None:
            prepared = self.load()
            array = sitk.GetArrayFromImage(prepared.image).astype(np.float32)
            brain = (sitk.GetArrayFromImage(prepared.mask) > 0).astype(np.uint8)
            meta = {"version": CACHE_VERSION, "sources": stamp, "shape": list(array.shape)}
            try:
                cache.mkdir(exist_ok=True)
                for name, data in (("image.npy", array), ("mask.npy", brain)):
                    with atomic_path(cache / name) as tmp:
                        np.save(tmp, data)
                write_json(meta, meta_path)
                image = np.load(cache / "image.npy", mmap_mode="r")
                mask = np.load(cache / "mask.npy", mmap_mode="r")
            except OSError as exc:
                log.warning("%s: cannot write the array cache (%s); keeping this subject in memory", cache, exc.strerror or exc)
                image, mask, writable = array, brain, False
        tissue = None
        if tissue_model:
            if "tissue" in meta:
                tissue = TissueModel.from_dict(meta["tissue"])
            else:
                tissue = fit_tissue_gmm(image, mask)
                meta["tissue"] = tissue.to_dict()
                if writable:
                    try:
                        write_json(meta, meta_path)
                    except OSError:
                        pass
        return image, mask, (cache if writable else None), tissue


def _listed_files(files: dict[str, Any]) -> list[str]:
    return list(files["images"].values()) + [files[key] for key in ("mask", "atlas_to_subject", "subject_to_atlas", "elastix")]


def is_complete(subject_dir: Path, config: PreprocessConfig, input_sha256: str | dict[str, str] | None = None) -> bool:
    """:meth:`PreparedFolder.is_complete` of ``subject_dir``."""
    return PreparedFolder(subject_dir).is_complete(config, input_sha256)


def load_prepared(subject_dir: str | Path, sequence: str | None = None) -> PreparedSubject:
    """Read a prepared subject folder (:meth:`PreparedFolder.load`); ``sequence`` picks one (default: the reference)."""
    return PreparedFolder(subject_dir).load(sequence)


def write_prepared(result: PreparedSubject, sidecar: dict[str, Any], subject_dir: Path,
                   files: dict[str, Any] | None = None, reference: str = SINGLE) -> None:
    """Write a prepared subject folder atomically (build under a temporary name, then rename)."""
    files = files or LEGACY_FILES
    subject_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{subject_dir.name}.", suffix=".tmp", dir=subject_dir.parent))
    try:
        os.chmod(staging, folder_mode())  # mkdtemp makes it 0700; the umask decides
        write_image(result.image, staging / files["images"][reference])
        for name, image in result.others.items():
            write_image(image, staging / files["images"][name])
        write_image(result.mask, staging / files["mask"])
        save_transform(result.atlas_to_subject, staging / files["atlas_to_subject"])
        save_transform(result.subject_to_atlas, staging / files["subject_to_atlas"])
        (staging / files["elastix"]).write_text(result.parameter_text, encoding="utf-8")
        write_json(sidecar, staging / SIDECAR)
        previous = None
        if subject_dir.exists():  # moved aside, not deleted, until the new folder is in place
            previous = Path(tempfile.mkdtemp(prefix=f".{subject_dir.name}.", suffix=".old.tmp", dir=subject_dir.parent))
            subject_dir.rename(previous / subject_dir.name)
        staging.rename(subject_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except OSError as exc:  # disk full, read-only: one line, nothing half-written left
        shutil.rmtree(staging, ignore_errors=True)
        raise write_failure(subject_dir, exc) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def find_prepared(prep_dir: str | Path) -> list[Path]:
    """Prepared subject folders in ``prep_dir``, sorted: ``<id>/`` children, or BIDS ``sub-*/[ses-*/]anat/``."""
    prep_dir = Path(prep_dir)
    if not prep_dir.is_dir():
        raise InputError(f"{prep_dir}: not a folder")
    found = [p for p in prep_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / SIDECAR).is_file()]
    found += [p for pattern in ("sub-*/anat", "sub-*/ses-*/anat") for p in prep_dir.glob(pattern) if (p / SIDECAR).is_file()]
    return sorted(set(found))


def prepared_name(folder: str | Path) -> str:
    """A prepared folder's id: ``prep/sub-01`` -> ``sub-01``; BIDS ``sub-01/ses-2/anat`` -> ``sub-01_ses-2``."""
    folder = Path(folder)
    if folder.name != "anat":
        return folder.name
    parts = [part for part in folder.parent.parts if part.startswith(("sub-", "ses-"))]
    return "_".join(parts[-2:] if len(parts) >= 2 and parts[-1].startswith("ses-") else parts[-1:]) or folder.parent.name

