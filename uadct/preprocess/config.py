"""The preprocessing parameters: one dataclass, stored in every sidecar and checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from uadct.errors import InputError
from uadct.preprocess.intensity import CT_BRAIN_WINDOW_HU
from uadct.preprocess.register import LEGACY_REGISTRATION_BACKEND, REGISTRATION_BACKENDS

LEGACY_BIAS_CORRECTION = "n4"  # what configs recorded without bias_correction_method ran
BIAS_CORRECTIONS = ("robust", "n4")

NO_ATLAS = "none"  # the atlas of 2D images: none (they are resized, not registered)

# per-modality defaults of the fields that differ (see PreprocessConfig.for_modality)
MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mr": {"skull_strip": "deepbet", "bias_correction": True, "bias_correction_method": "robust", "normalization": "tissue"},
    "ct": {"skull_strip": "ct", "bias_correction": False, "normalization": "ct-window"},
    # 2D images (uadct.preprocess.image2d): resized, normalised, no atlas, skull-strip, N4 or registration
    "xray": {"atlas": NO_ATLAS, "skull_strip": "none", "registration": "none", "bias_correction": False,
             "normalization": "percentile", "percentiles": (1.0, 99.0), "image_size": (256, 256), "fov_mask": "nonzero"},
    "image": {"atlas": NO_ATLAS, "skull_strip": "none", "registration": "none", "bias_correction": False,
              "normalization": "percentile", "percentiles": (1.0, 99.0), "image_size": (256, 256), "fov_mask": "image"},
}
IMAGE_MODALITIES = ("xray", "image")


@dataclass
class PreprocessConfig:
    """Every parameter of the chain (stored in sidecars and checkpoints)."""

    atlas: str = "sri24"
    skull_strip: str = "deepbet"
    registration: str = "affine"
    registration_backend: str = "sitk"  # "sitk" (SimpleITK, ~1 s) or "elastix" (itk-elastix); older records: elastix
    bias_correction: bool = True
    bias_correction_method: str = "robust"  # "robust": N4 fitted on normal tissue only (uadct.preprocess.tissue); "n4": whole mask
    normalization: str = "tissue"  # normal-tissue median -> 0.5, 4 robust SDs -> 1 (lesion-robust); "percentile" before
    percentiles: tuple[float, float] = (5.0, 95.0)
    ct_window: tuple[float, float] = CT_BRAIN_WINDOW_HU  # (level, width) in HU, for normalization="ct-window"
    mask_threshold: float = 0.5
    mask_opening_radius: int = 2
    sequences: tuple[str, ...] = ()  # e.g. ("T1w", "FLAIR"); empty: one scan per subject
    reference: str = ""  # the sequence that is skull-stripped and registered (default: the first)
    resolution_mm: float | None = None  # blur finer scans to this effective resolution first (uadct.preprocess.resolution)
    image_size: tuple[int, int] | None = None  # 2D images only: (H, W) pixels they are resized to; None for volumes
    resize: str = "pad"  # 2D: pad (aspect kept, whole image, zero border), crop (aspect kept, centre) or stretch
    fov_mask: str = "image"  # 2D: the scored area: image (all of it), nonzero (pixels != 0 as read) or otsu

    @property
    def is_2d(self) -> bool:
        """True for 2D images (``--modality xray|image``): resized instead of registered to an atlas."""
        return self.image_size is not None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["percentiles"] = list(self.percentiles)
        data["ct_window"] = list(self.ct_window)
        data["sequences"] = list(self.sequences)
        if self.image_size is None:  # volumes: the sidecars and checkpoints of before 2D images, unchanged
            for name in ("image_size", "resize", "fov_mask"):
                data.pop(name)
        else:
            data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("bias_correction_method", LEGACY_BIAS_CORRECTION)  # recorded before the field existed
        values.setdefault("registration_backend", LEGACY_REGISTRATION_BACKEND)  # likewise
        for name in ("percentiles", "ct_window", "sequences", "image_size"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def for_modality(cls, modality: str, **overrides: Any) -> "PreprocessConfig":
        """Defaults for ``mr`` (deepbet, robust N4, tissue normalisation), ``ct`` (HU thresholds, no N4, brain
        window), or the 2D ``xray`` and ``image`` (resized to 256 x 256, 1st/99th percentile normalisation).

        ``overrides`` that are not None replace the modality's defaults.
        """
        if modality not in MODALITY_DEFAULTS:
            raise InputError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITY_DEFAULTS)}")
        values = dict(MODALITY_DEFAULTS[modality])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("bias_correction_method", LEGACY_BIAS_CORRECTION) not in BIAS_CORRECTIONS:
            raise InputError(f"unknown bias-field correction {values['bias_correction_method']!r}; "
                             f"choose one of {', '.join(BIAS_CORRECTIONS)}")
        if values.get("registration_backend", LEGACY_REGISTRATION_BACKEND) not in REGISTRATION_BACKENDS:
            raise InputError(f"unknown registration backend {values['registration_backend']!r}; "
                             f"choose one of {', '.join(REGISTRATION_BACKENDS)}")
        if values.get("resolution_mm") is not None and not values["resolution_mm"] > 0:
            raise InputError(f"the target resolution must be positive, got {values['resolution_mm']:g} mm")
        if modality in IMAGE_MODALITIES:
            check_2d_config(modality, values)
        elif any(overrides.get(name) is not None for name in ("image_size", "resize", "fov_mask")):
            raise InputError(f"--image-size, --resize and --fov-mask apply to 2D images (--modality xray or image), not {modality}")
        return cls(**values)


RESIZE_MODES = ("pad", "crop", "stretch")
FOV_MASKS = ("image", "nonzero", "otsu")
NORMALIZATIONS_2D = ("percentile", "zscore", "ct-window", "dicom-window")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096  # pixels per side of the prepared grid


def parse_image_size(text: str) -> tuple[int, int]:
    """``--image-size``: ``"256"`` -> (256, 256); ``"256x320"`` (H x W) -> (256, 320)."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--image-size {text!r}: expected N or HxW pixels, e.g. 256 or 256x320") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE for v in values):
        raise InputError(f"--image-size {text!r}: expected N or HxW with {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels per side")
    return values[0], values[1]


def check_2d_config(modality: str, values: dict[str, Any]) -> None:
    """Refuse settings that do not apply to 2D images (``values``: the config fields, modality defaults applied)."""
    for name, allowed, option in (("atlas", "none", "--atlas"), ("skull_strip", "none", "--skull-strip"),
                                  ("registration", "none", "--registration")):
        if values.get(name, allowed) != allowed:
            raise InputError(f"--modality {modality}: 2D images are resized, not skull-stripped or registered; "
                             f"leave out {option} (got {values[name]!r})")
    if values.get("bias_correction"):
        raise InputError(f"--modality {modality}: no bias-field correction for 2D images; leave out --bias-correction")
    if values.get("resolution_mm") is not None:
        raise InputError(f"--modality {modality}: --resolution-mm applies to volumes; 2D images are resized with --image-size")
    if values.get("sequences"):
        raise InputError(f"--modality {modality}: one image per subject; leave out --sequences")
    if values.get("normalization") not in NORMALIZATIONS_2D:
        raise InputError(f"--modality {modality}: normalisation {values.get('normalization')!r} does not apply to 2D "
                         f"images; choose one of {', '.join(NORMALIZATIONS_2D)}")
    if values.get("resize", "pad") not in RESIZE_MODES:
        raise InputError(f"--resize {values['resize']!r}: choose one of {', '.join(RESIZE_MODES)}")
    if values.get("fov_mask", "image") not in FOV_MASKS:
        raise InputError(f"--fov-mask {values['fov_mask']!r}: choose one of {', '.join(FOV_MASKS)}")
