"""The demo's geometry convention: physical points and indices, and the generating transform.

The recorded transform ``T`` of a subject maps *subject* physical points (LPS mm) to *atlas*
physical points, ``p_atlas = B(A(p_subject))`` with ``A`` the affine and ``B`` the B-spline
deformation (the way ``SimpleITK.Resample`` uses it to render the subject). The
atlas-to-subject mapping is its inverse; :func:`atlas_to_subject` computes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from uadct.errors import InputError


def index_to_physical(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (index_xyz * np.asarray(image.GetSpacing())) @ direction.T


def physical_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return ((points - np.asarray(image.GetOrigin())) @ direction) / np.asarray(image.GetSpacing())


def atlas_to_subject(points: Sequence[Sequence[float]] | np.ndarray, transform: sitk.Transform,
                     tolerance_mm: float = 1e-5, max_iterations: int = 50) -> np.ndarray:
    """Map atlas physical points (N, 3) to subject space by inverting ``transform`` (Newton).

    ``transform`` maps subject points to atlas points (the recorded generating transform).
    """
    out = []
    for target in np.asarray(points, dtype=float).reshape(-1, 3):
        x = target.copy()
        for _ in range(max_iterations):
            residual = target - np.array(transform.TransformPoint(tuple(x)))
            if np.linalg.norm(residual) < tolerance_mm:
                break
            jacobian = np.empty((3, 3))
            for axis in range(3):
                step = np.zeros(3)
                step[axis] = 0.5
                jacobian[:, axis] = (np.array(transform.TransformPoint(tuple(x + step)))
                                     - np.array(transform.TransformPoint(tuple(x - step))))
            x = x + np.linalg.solve(jacobian, residual)
        else:
            raise ValueError(f"atlas point {target.tolist()} could not be mapped to subject space")
        out.append(x)
    return np.array(out)


def read_truth_transform(path: str | Path) -> sitk.Transform:
    """The generating transform (subject -> atlas points) of a truth ``.json`` or ``.tfm``."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            truth = json.loads(path.read_text(encoding="utf-8"))
            path = path.parent / truth["transform"]["file"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: not a demo truth file ({exc})") from None
    if not path.is_file():
        raise InputError(f"{path}: transform file not found")
    return sitk.ReadTransform(str(path))
