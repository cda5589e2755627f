"""The contract every anomaly model follows, and the registry that finds them.

A model is an ``nn.Module`` holding only the maths; the training engine
(:mod:`uadct.train`) owns the loop. Subclasses register themselves by name through
``__init_subclass__``; hyper-parameters are a dataclass (``Config``) with the papers'
defaults, stored in checkpoints so a model can be rebuilt from its metadata alone.
Fitted statistics live in buffers so they travel with the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from uadct.errors import CheckpointError, UadctError

MODEL_REGISTRY: dict[str, type["AnomalyModel"]] = {}


@dataclasses.dataclass
class ModelConfig:
    """Hyper-parameters shared by all models."""

    patch_size: int = 16
    dims: int = 2
    in_channels: int = 1
    position_conditioning: bool = False  # the patch centre (normalised atlas coordinates) is an extra input


class AnomalyModel(nn.Module):
    """Base class: ``training_loss`` for fitting, ``score_patches`` for inference.

    ``score_patches`` returns a dict with ``"voxel"`` (``(B, *patch)`` error maps)
    and/or ``"scalar"`` (``(B,)`` scores); ``outputs`` declares which.

    Every hook that sees patches also takes ``positions``: the patch centres ``(B, 3)``
    float32 in [-1, 1] (:func:`uadct.patches.patch_centres`). Callers pass them when
    :attr:`uses_positions` is true (``position_conditioning`` on a model that supports
    it, ``supports_positions``); such a model refuses ``positions=None``, the others ignore them.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    outputs: ClassVar[tuple[str, ...]] = ("voxel",)
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    supports_positions: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in MODEL_REGISTRY:
                raise UadctError(f"model name {cls.name!r} registered twice")
            MODEL_REGISTRY[cls.name] = cls

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.position_conditioning and not self.supports_positions:
            raise UadctError(f"{self.name}: position_conditioning is not supported by this model")
        self.config = config

    @property
    def uses_positions(self) -> bool:
        """Whether the hooks need ``positions`` (the patch centres)."""
        return bool(self.config.position_conditioning)

    def require_positions(self, positions: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``positions`` checked to be ``(batch, 3)``; a one-line error when missing."""
        if positions is None:
            raise UadctError(f"{self.name}: trained with position_conditioning, so patch positions must be given")
        if tuple(positions.shape) != (batch, 3):
            raise UadctError(f"{self.name}: positions must be ({batch}, 3) patch centres, got {tuple(positions.shape)}")
        return positions

    def advance_stage(self) -> bool:
        """Called by the engine when early stopping would end training. A model that grows
        in stages (progressive GANs) moves to its next stage and returns True, so training
        goes on; the default returns False: no further stage."""
        return False

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses for a batch ``(B, 1, *patch)``; the key ``"loss"`` is minimised."""
        raise NotImplementedError

    def configure_optimizers(self, learning_rate: float) -> dict[str, torch.optim.Optimizer]:
        """Optimisers by name; one Adam over all parameters unless a model needs more (GANs)."""
        return {"model": torch.optim.Adam(self.parameters(), lr=learning_rate)}

    def training_step(
        self, patches: torch.Tensor, masks: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer],
        positions: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One optimisation step on a batch; returns the losses as floats (key ``"loss"`` required).

        The default minimises ``training_loss()["loss"]`` with the single optimiser;
        adversarial models override it to alternate generator and discriminator updates.
        """
        losses = self.training_loss(patches, masks, positions=positions)
        optimizer = optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def validation_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        """The loss early stopping watches (eval mode, no gradients)."""
        return float(self.training_loss(patches, masks, positions=positions)["loss"])

    def fit_statistics(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Called once after training with a sample of training patches, to fit score
        statistics (e.g. median/MAD) into buffers. Non-parametric models (one-class SVM,
        thresholds) fit themselves here. Default: nothing."""

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Anomaly scores for a batch ``(B, 1, *patch)``."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


class NonTrainableModel(AnomalyModel):
    """Training hooks for models without parameters, fitted only in ``fit_statistics``.

    The engine's loop still runs: each step reports a zero loss and validation a constant
    one, so early stopping ends training after ``patience`` epochs. The buffer ``fitted``
    says whether ``fit_statistics`` has run (it travels with the checkpoint).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.register_buffer("fitted", torch.tensor(False))

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return {"loss": patches.new_zeros(())}

    def configure_optimizers(self, learning_rate: float) -> dict[str, torch.optim.Optimizer]:
        return {}

    def training_step(
        self, patches: torch.Tensor, masks: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer],
        positions: torch.Tensor | None = None,
    ) -> dict[str, float]:
        return {"loss": 0.0}

    def validation_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        return 0.0

    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise UadctError(f"{self.name}: not fitted; call fit_statistics (training does) before scoring")


def median_and_mad(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column median and median absolute deviation of ``(N, K)`` values -> two ``(K,)``.

    The median of an even count is the mean of the two middle values (as ``np.median``).
    Used for the "modified anomaly score" (van Hespen et al. 2021) and robust baselines.
    """
    if values.shape[0] == 0:
        raise UadctError("median of an empty set: no training patch has brain in it")

    def median(x: torch.Tensor) -> torch.Tensor:
        ordered = x.sort(dim=0).values
        n = ordered.shape[0]
        return 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])

    centre = median(values)
    return centre, median((values - centre).abs())


def available_models() -> dict[str, str]:
    """Registered model names with their one-line summaries."""
    return {name: cls.summary for name, cls in sorted(MODEL_REGISTRY.items())}


def model_class(name: str) -> type[AnomalyModel]:
    """The class registered under ``name``; the error lists what exists."""
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise UadctError(f"unknown model {name!r}; available: {', '.join(sorted(MODEL_REGISTRY))}") from None


def build_model(name: str, config: dict[str, Any] | None = None) -> AnomalyModel:
    """Instantiate a registered model from a plain config dict (unknown keys are refused)."""
    cls = model_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    config = dict(config or {})
    unknown = set(config) - fields
    if unknown:
        raise CheckpointError(f"model {name!r} has no parameters {sorted(unknown)}; known: {sorted(fields)}")
    return cls(cls.Config(**config))
