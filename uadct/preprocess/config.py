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

# per-modality defaults of the fields that differ (see PreprocessConfig.for_modality)
MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mr": {"skull_strip": "deepbet", "bias_correction": True, "bias_correction_method": "robust", "normalization": "tissue"},
    "ct": {"skull_strip": "ct", "bias_correction": False, "normalization": "ct-window"},
}


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

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["percentiles"] = list(self.percentiles)
        data["ct_window"] = list(self.ct_window)
        data["sequences"] = list(self.sequences)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("bias_correction_method", LEGACY_BIAS_CORRECTION)  # recorded before the field existed
        values.setdefault("registration_backend", LEGACY_REGISTRATION_BACKEND)  # likewise
        for name in ("percentiles", "ct_window", "sequences"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def for_modality(cls, modality: str, **overrides: Any) -> "PreprocessConfig":
        """Defaults for ``mr`` (deepbet, robust N4, tissue normalisation) or ``ct`` (HU thresholds, no N4, brain window).

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
        return cls(**values)

