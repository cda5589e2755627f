"""Score calibration: the healthy score scale a checkpoint carries, and MOOD's [0, 1] maps.

Apart from the models (like anomalib's ``post_processing``): the scale is measured once
at the end of training on held-out healthy patches (:func:`estimate_score_scale`) and
stored in the checkpoint (:attr:`uadct.checkpoint.Checkpoint.score_scale`); scoring
applies it (:func:`mood_scaled`).
"""

from __future__ import annotations

from typing import Any, Callable

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

