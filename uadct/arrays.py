"""Small numpy helpers shared by scoring, evaluation and drawing (one definition each)."""

from __future__ import annotations

import numpy as np


def top_k_mean(values: np.ndarray, k: int, axis: int | None = None) -> float | np.ndarray:
    """Mean of the ``k`` largest of ``values`` (all of them when fewer), in float64; 0.0 when empty.

    With ``axis`` (of a 2D array): the mean of each row's (``axis=1``) or column's ``k``
    largest values, as a float64 array.
    """
    if axis is not None:
        values = np.asarray(values)
        k = max(1, min(int(k), values.shape[axis]))
        top = np.partition(values, values.shape[axis] - k, axis=axis)
        return np.take(top, np.arange(values.shape[axis] - k, values.shape[axis]), axis=axis).mean(axis=axis, dtype=np.float64)
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        return 0.0
    k = max(1, min(int(k), flat.size))
    return float(np.partition(flat, flat.size - k)[-k:].mean(dtype=np.float64))


def bounding_box(region: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """The smallest box holding every true voxel of ``region``, grown by ``margin`` voxels
    on each side (clipped to the array); the whole array when ``region`` is empty."""
    if not region.any():
        return tuple(slice(None) for _ in range(region.ndim))
    box = []
    for axis in range(region.ndim):
        other = tuple(a for a in range(region.ndim) if a != axis)
        inside = np.flatnonzero(region.any(axis=other))
        box.append(slice(max(0, int(inside[0]) - margin), min(region.shape[axis], int(inside[-1]) + 1 + margin)))
    return tuple(box)
