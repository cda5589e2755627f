"""A score map's files: the map, its JSON sidecar (:class:`ScoreSidecar`) and the MOOD score file.

``uadct score`` writes ``<map>.nii.gz``, then ``<map>.json`` (the sidecar, always last, so
a map is complete only when its sidecar exists) and with ``--mood`` ``<map>.nii.gz.txt``.
This module is the one reader and writer of the sidecar; scoring, ``evaluate`` (image
scores) and ``heatmap`` (colour-bar units) go through it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uadct.errors import InputError
from uadct.io import map_sidecar_path, write_json

GENERIC_UNIT = "anomaly score (map units)"


@dataclass
class ScoreSidecar:
    """What ``<map>.json`` records: the image-level score, the checkpoint, settings, timings.

    ``settings`` is everything that decides the map's values (a map with other settings
    is not "done"); ``unit`` (optional) labels colour bars; keys this version does not
    know are kept in ``extra`` and written back.
    """

    subject: str | None = None
    input_sha256: str | None = None
    map: str | None = None
    image_score: float | None = None
    image_score_definition: str | None = None
    checkpoint: str | None = None
    model: str | None = None
    stride: int | None = None
    output_kind: str | None = None
    gaussian_sigma: float | None = None
    mood_scaling: str | None = None
    settings: dict[str, Any] | None = None
    batch: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    unit: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> "ScoreSidecar":
        """Parse a sidecar's JSON object; an ``image_score`` that is not a finite number is an :class:`InputError`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        value = data.get("image_score")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise InputError(f"{path or 'score sidecar'}: image_score must be a finite number, found {value!r}")
        sidecar = cls(**{k: v for k, v in data.items() if k in known})
        sidecar.extra = {k: v for k, v in data.items() if k not in known and k != "extra"}
        if sidecar.image_score is not None:
            sidecar.image_score = float(sidecar.image_score)
        return sidecar

    @classmethod
    def read(cls, map_path: str | Path) -> "ScoreSidecar | None":
        """The sidecar of the map at ``map_path``; ``None`` when there is none, an :class:`InputError` when unreadable."""
        path = map_sidecar_path(map_path)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable score sidecar ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: not a readable score sidecar (a JSON object expected)")
        return cls.from_dict(data, path)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("unit", "extra")}
        if self.unit is not None:
            data["unit"] = self.unit
        return {**data, **self.extra}

    def write(self, map_path: str | Path) -> Path:
        """Write ``<map>.json`` atomically; returns its path."""
        return write_json(self.to_dict(), map_sidecar_path(map_path))

    @property
    def colour_bar_unit(self) -> str:
        """Colour-bar label: ``unit``; a MOOD-scaled map's range; else the model and output kind."""
        if self.unit:
            return str(self.unit)
        if self.mood_scaling:
            return "anomaly score (0-1, MOOD scaling)"
        details = ", ".join(str(v) + (" output" if k == "output_kind" else "")
                            for k, v in (("model", self.model), ("output_kind", self.output_kind)) if v)
        return f"anomaly score ({details})" if details else GENERIC_UNIT


def mood_score_path(map_path: str | Path) -> Path:
    """``case.nii.gz`` -> ``case.nii.gz.txt`` (the MOOD sample-score file)."""
    return Path(str(map_path) + ".txt")


def map_state(out_path: str | Path, settings: dict[str, Any], input_sha256: str | None = None) -> str:
    """``"done"`` (map and sidecar there, same settings, same input checksum when given),
    ``"stale"`` (the input was replaced since), ``"different"`` (made with other settings or
    another checkpoint) or ``"missing"`` (absent, or left incomplete by a killed run)."""
    out_path = Path(out_path)
    if not out_path.is_file() or not map_sidecar_path(out_path).is_file():
        return "missing"
    if settings.get("mood") and not mood_score_path(out_path).is_file():
        return "missing"
    try:
        sidecar = ScoreSidecar.read(out_path)
    except InputError:
        return "missing"
    if sidecar is None:
        return "missing"
    if sidecar.settings != settings:
        return "different"
    return "stale" if input_sha256 is not None and sidecar.input_sha256 != input_sha256 else "done"
