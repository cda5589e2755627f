"""Patches -> scores: the batched patch predictor and the scoring batch plan (memory-bounded).

:func:`patch_predictor` turns a model and its output kind into a function from patch
batches (with their centres, and the subject's covariates when the model uses them) to
voxel or patch scores; :func:`plan_scoring_batch` sizes the batches from the memory one
patch needs (:mod:`uadct.memory`). :class:`uadct.inference.Inferer` uses both.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from uadct.calibration import resolve_output_kind
from uadct.errors import UadctError
from uadct.memory import BatchPlan, default_budget, inference_bytes_per_patch, model_bytes, plan_batch
from uadct.models import AnomalyModel
from uadct.patches import PatchSpec, patch_centres


def patch_predictor(
    model: torch.nn.Module, device: torch.device, output: str | None = None,
    volume_shape: tuple[int, int, int] | None = None, spec: PatchSpec | None = None,
    covariates: np.ndarray | None = None,
) -> Callable[..., np.ndarray]:
    """Wrap a model's ``score_patches`` as a numpy ``(B, *patch) -> (B, *patch) or (B,)`` function.

    ``output`` is ``"voxel"`` or ``"scalar"``; default the model's first declared output.
    For a position-conditioned model (``model.uses_positions``) the function also takes
    the patches' starts ``(B, 3)`` and passes their centres
    (:func:`uadct.patches.patch_centres` on ``volume_shape``) to the model. A model conditioned
    on subject covariates (``model.uses_covariates``) gets ``covariates`` ``(K,)`` for every patch.
    """
    key = resolve_output_kind(model, output)
    # any module with score_patches works here (MONAI-style); uadct models define uses_positions
    conditioned = bool(getattr(model, "uses_positions", False))
    subject: torch.Tensor | None = None
    if getattr(model, "uses_covariates", False):
        if covariates is None:
            raise UadctError(f"model {getattr(model, 'name', '?')!r} is conditioned on subject covariates; "
                             "give them (--covariates participants.tsv, or --age/--sex)")
        subject = torch.as_tensor(np.asarray(covariates, np.float32)).reshape(1, -1).to(device)

    @torch.inference_mode()
    def predict(patches: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).unsqueeze(1).to(device)
        extra = {}
        if conditioned:
            if starts is None or volume_shape is None or spec is None:
                raise UadctError(f"model {getattr(model, 'name', '?')!r} is conditioned on patch positions; give the patch starts and volume shape")
            extra["positions"] = torch.from_numpy(patch_centres(starts, spec, volume_shape)).to(device)
        if subject is not None:
            extra["covariates"] = subject.expand(len(batch), -1)
        return model.score_patches(batch, **extra)[key].float().cpu().numpy()

    return predict


# bytes per atlas-grid voxel the scorer holds whatever the batch: the image (float32, and
# its copy), the mask, the float64 sum and int32 count of the accumulator, the transient
# int64 cumulative sums of the count, the start grid's box sums and the float32 result
SCORING_BYTES_PER_VOXEL = 72
# bytes per patch voxel outside the model: the cut patch (float32), its tensor copy, the
# float64 values and int64 flat indices of the overlap-add
SCORING_BYTES_PER_PATCH_VOXEL = 32


def scoring_bytes_per_patch(model: AnomalyModel, spec: PatchSpec, device: torch.device) -> int:
    """Bytes one patch costs while scoring: the model's activations (measured) and the overlap-add's arrays."""
    score = None
    if model.uses_positions or getattr(model, "uses_covariates", False):  # the probe batch sits at the volume centre
        def score(batch: torch.Tensor) -> Any:
            extra = {"positions": batch.new_zeros(len(batch), 3)} if model.uses_positions else {}
            if getattr(model, "uses_covariates", False):
                extra["covariates"] = batch.new_zeros(len(batch), model.covariate_features)
            return model.score_patches(batch, **extra)
    return inference_bytes_per_patch(model, spec.tensor_shape, device, score) + SCORING_BYTES_PER_PATCH_VOXEL * int(np.prod(spec.shape))


def plan_scoring_batch(model: AnomalyModel, spec: PatchSpec, volume_shape: tuple[int, ...], device: torch.device,
                       batch_size: int | None = None, max_memory: int | None = None,
                       per_patch: int | None = None) -> BatchPlan:
    """The scoring batch size for ``model`` on a volume of ``volume_shape`` within a memory budget.

    ``per_patch``: :func:`scoring_bytes_per_patch`, when already measured.
    """
    per_patch = per_patch if per_patch is not None else scoring_bytes_per_patch(model, spec, device)
    fixed = SCORING_BYTES_PER_VOXEL * int(np.prod(volume_shape)) + model_bytes(model)
    budget = max_memory if max_memory is not None else default_budget(device)
    return plan_batch(batch_size, per_patch, fixed, budget, "scoring")
