"""Score calibration, apart from the models (like anomalib's ``post_processing``).

Two calibrations travel with a checkpoint:

- the **score scale** (:func:`estimate_score_scale`): a robust maximum of healthy patch
  scores measured at the end of training, stored as ``score_scale``
  (:attr:`uadct.checkpoint.Checkpoint.score_scale`); MOOD maps are ``clip(map / scale, 0,
  1)`` (:func:`mood_scaled`);
- **calibrated map units and healthy false-positive-rate thresholds**: at training time
  the voxel scores of whole held-out healthy subjects (their maps, inside the brain, made
  with the scoring settings of the map) are summarised as their quantile function: the
  scores at ~1,000 quantile levels, dense in the upper tail (down to one voxel in the
  pool). That :class:`Calibration` is stored in the checkpoint's metadata under
  ``"calibration"`` (a list: one entry per scoring setting it was made with) and turns
  any map into units that mean the same for every subject and model:

  - ``quantile``: the healthy cumulative probability F(s) = P(healthy score <= s), in [0, 1];
  - ``z``: the standard normal quantile of F(s) (a healthy voxel is N(0, 1) by construction);
  - ``logp``: -log10 of the healthy exceedance probability 1 - F(s) (2 = one healthy voxel in 100);

  and a voxel false-positive rate into a score threshold (:func:`threshold_at_fpr`): the
  ``1 - fpr`` quantile of the healthy voxels. Scoring the healthy subjects is
  :mod:`uadct.calibrate_maps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from uadct.errors import UadctError

SCORE_SCALE_QUANTILE = 0.999


def resolve_output_kind(model: torch.nn.Module, output: str | None) -> str:
    """The model output to map: ``output`` if the model declares it, else its first declared one."""
    declared = tuple(getattr(model, "outputs", ("voxel",)))
    if output is None:
        return declared[0]
    if output not in declared:
        raise UadctError(
            f"model {getattr(model, 'name', type(model).__name__)!r} has no {output!r} output; "
            f"it declares {', '.join(declared)}"
        )
    return output


def mood_scaled(anomaly_map: np.ndarray, mask: np.ndarray, scale: float | None) -> tuple[np.ndarray, str]:
    """Map values in [0, 1] for MOOD submissions, and how they were scaled.

    With ``scale`` (a robust maximum of healthy voxel scores stored in the checkpoint as
    ``metadata["score_scale"]``) the map is ``clip(map / scale, 0, 1)``: the same monotone
    function for every case, so voxels stay comparable across cases (MOOD pools voxels of
    all cases for its voxel-level AP). Without it the map is min-max scaled per case inside
    the brain: ranks inside a case are kept, but across cases they are not (a healthy case
    also reaches 1). Outside the brain the map is 0.
    """
    inside = mask > 0
    out = np.zeros(anomaly_map.shape, dtype=np.float32)
    if not inside.any():
        return out, "empty brain mask"
    values = anomaly_map[inside].astype(np.float64)
    if scale is not None and scale > 0:
        out[inside] = np.clip(values / scale, 0.0, 1.0)
        return out, f"clip(map / {scale:.6g}, 0, 1) (checkpoint score_scale)"
    low, high = float(values.min()), float(values.max())
    out[inside] = (values - low) / (high - low) if high > low else 0.0
    return out, "per-case min-max inside the brain"


def estimate_score_scale(model: torch.nn.Module, patches: np.ndarray, masks: np.ndarray, batch_size: int,
                         device: torch.device, output_kind: str | None = None, quantile: float = SCORE_SCALE_QUANTILE,
                         hook_options: Callable[[slice], dict[str, Any]] | None = None) -> float | None:
    """A robust maximum of healthy scores: the ``quantile`` of the model's outputs on held-out
    healthy patches ``(N, 1, *patch)`` (voxel outputs inside the brain masks, or the
    per-patch scalars). ``hook_options(rows)`` gives extra keyword arguments for the
    patches ``rows`` (a slice), e.g. the patch centres of position-conditioned models.
    Stored in checkpoints as ``score_scale`` so MOOD maps are scaled by one fixed,
    case-independent factor. None when nothing was scored or the value is not positive.
    """
    key = resolve_output_kind(model, output_kind)
    values = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(patches), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(patches[start : start + batch_size], dtype=np.float32)).to(device)
            mask = torch.from_numpy(np.ascontiguousarray(masks[start : start + batch_size], dtype=np.float32)).to(device)
            extra = hook_options(slice(start, start + batch_size)) if hook_options else {}
            output = model.score_patches(batch, mask, **extra)[key].float()
            if key == "voxel":
                output = output.reshape(mask.shape)[mask > 0]
            values.append(output.reshape(-1).cpu().numpy())
    flat = np.concatenate(values) if values else np.zeros(0)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return None
    scale = float(np.quantile(flat, quantile))
    return scale if scale > 0 else None


CALIBRATION_KEY = "calibration"  # checkpoint metadata: list of Calibration.to_dict()
UNITS = ("raw", "quantile", "z", "logp")
UNIT_LABELS = {
    "raw": "model score",
    "quantile": "healthy quantile",
    "z": "z (healthy voxels)",
    "logp": "-log10 healthy p",
}
QUANTILE_COUNT = 1000


@dataclass
class Calibration:
    """The healthy voxel-score distribution of a model under fixed scoring settings.

    ``levels`` ``(K,)`` increasing cumulative probabilities in [0, 1] and ``values``
    ``(K,)`` the healthy scores at those levels (non-decreasing); ``n_voxels`` brain
    voxels of ``subjects`` were pooled; ``settings`` are the scoring settings (stride,
    averaging, output, post-processing) the maps were made with.
    """

    levels: np.ndarray
    values: np.ndarray
    n_voxels: int
    subjects: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"levels": [float(v) for v in self.levels], "values": [float(v) for v in self.values],
                "n_voxels": int(self.n_voxels), "subjects": list(self.subjects), "settings": dict(self.settings),
                "scope": "global"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        try:
            levels = np.asarray(data["levels"], dtype=np.float64)
            values = np.asarray(data["values"], dtype=np.float64)
            n_voxels = int(data["n_voxels"])
        except (KeyError, TypeError, ValueError):
            raise UadctError("checkpoint calibration is incomplete (levels, values, n_voxels)") from None
        if levels.shape != values.shape or levels.ndim != 1 or levels.size < 2 or np.any(np.diff(levels) <= 0) or np.any(np.diff(values) < 0):
            raise UadctError("checkpoint calibration is corrupt (levels and values must be increasing and of equal length)")
        return cls(levels, values, n_voxels, list(data.get("subjects", [])), dict(data.get("settings", {})))

    @property
    def p_floor(self) -> float:
        """The smallest exceedance probability the pool can resolve: half a voxel."""
        return 0.5 / max(1, self.n_voxels)


def quantile_levels(n_voxels: int, count: int = QUANTILE_COUNT) -> np.ndarray:
    """About ``count`` increasing levels in [0, 1]: half evenly spaced up to 0.99, half with
    exceedance probabilities geometrically spaced from 1e-2 down to one voxel of the pool."""
    tail = count // 2
    body = np.linspace(0.0, 0.99, count - tail, endpoint=False)
    smallest = min(1e-2, 1.0 / max(1, n_voxels))
    exceedance = np.geomspace(1e-2, smallest, tail) if smallest < 1e-2 else np.array([1e-2])
    return np.unique(np.concatenate([body, 1.0 - exceedance, [1.0]]))


def fit_calibration(samples: Iterable[np.ndarray], subjects: list[str] | None = None,
                    settings: dict[str, Any] | None = None, count: int = QUANTILE_COUNT) -> Calibration:
    """Pool the healthy voxel scores ``samples`` (one 1D array per subject, brain voxels only)
    and keep their quantile function (numpy's linear quantiles at :func:`quantile_levels`)."""
    pooled = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples] or [np.zeros(0)])
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size < 100:
        raise UadctError(f"calibration needs at least 100 healthy brain voxels, got {pooled.size}")
    levels = quantile_levels(pooled.size, count)
    values = np.maximum.accumulate(np.quantile(pooled, levels))
    return Calibration(levels, values, int(pooled.size), list(subjects or []), dict(settings or {}))


def cumulative(scores: np.ndarray, calibration: Calibration) -> np.ndarray:
    """F(s) = P(healthy score <= s) for every score (right-continuous at tied healthy values)."""
    values, levels = calibration.values, calibration.levels
    # a tied value (a point mass, e.g. many zeros) keeps the highest level it reaches
    last = len(values) - 1 - np.unique(values[::-1], return_index=True)[1]
    unique_values, unique_levels = values[last], levels[last]
    below = np.interp(np.asarray(scores, dtype=np.float64), unique_values, unique_levels, left=0.0, right=1.0)
    return below


def to_units(scores: np.ndarray, calibration: Calibration | None, units: str) -> np.ndarray:
    """Scores ``(...)`` in ``units`` (one of :data:`UNITS`), float32, same shape."""
    if units not in UNITS:
        raise UadctError(f"unknown map units {units!r}; expected one of {', '.join(UNITS)}")
    scores = np.asarray(scores)
    if units == "raw":
        return scores.astype(np.float32, copy=False)
    if calibration is None:
        raise UadctError(f"map units {units!r} need a calibrated checkpoint")
    probability = cumulative(scores, calibration)
    floor = calibration.p_floor
    if units == "quantile":
        return probability.astype(np.float32)
    if units == "z":
        from scipy.special import ndtri

        return ndtri(np.clip(probability, floor, 1.0 - floor)).astype(np.float32)
    return (-np.log10(np.maximum(1.0 - probability, floor))).astype(np.float32)


def threshold_at_fpr(calibration: Calibration, fpr: float) -> float:
    """The raw score above which a fraction ``fpr`` of the healthy voxels lies."""
    if not 0.0 < fpr < 1.0:
        raise UadctError(f"voxel false-positive rate must be in (0, 1), got {fpr}")
    return float(np.interp(1.0 - fpr, calibration.levels, calibration.values))


def calibration_settings(stride: int, gaussian_sigma: float | None, output_kind: str,
                         postprocess: dict[str, Any] | None = None) -> dict[str, Any]:
    """The scoring settings a calibration depends on (the same dictionary at training and scoring)."""
    return {"stride": int(stride), "gaussian_sigma": gaussian_sigma, "output_kind": output_kind,
            "postprocess": dict(postprocess or {})}


def stored_calibrations(metadata: dict[str, Any]) -> list[Calibration]:
    """Every calibration a checkpoint's metadata holds (none for checkpoints made before calibration)."""
    return [Calibration.from_dict(item) for item in metadata.get(CALIBRATION_KEY) or []]


def find_calibration(metadata: dict[str, Any], settings: dict[str, Any]) -> Calibration:
    """The stored calibration made with ``settings``, or an error saying which settings exist."""
    stored = stored_calibrations(metadata)
    for calibration in stored:
        if calibration.settings == settings:
            return calibration
    if not stored:
        raise UadctError("the checkpoint has no healthy calibration (trained before calibration existed, or with "
                         "--calibration-subjects 0); run `uadct calibrate` on healthy prepared subjects")
    known = "; ".join(describe_settings(c.settings) for c in stored)
    raise UadctError(f"the checkpoint is calibrated for other scoring settings ({known}), not for {describe_settings(settings)}; "
                     "score with those settings or run `uadct calibrate` with these")


def describe_settings(settings: dict[str, Any]) -> str:
    """``stride 4, plain mean, voxel, no post-processing`` (for messages)."""
    post = settings.get("postprocess") or {}
    post_text = ", ".join(f"{k} {v}" for k, v in post.items()) or "no post-processing"
    sigma = settings.get("gaussian_sigma")
    averaging = f"gaussian {sigma}" if sigma is not None else "plain mean"
    return f"stride {settings.get('stride')}, {averaging}, {settings.get('output_kind')} output, {post_text}"
