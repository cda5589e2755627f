"""The contract every anomaly model follows, and the registry that finds them.

A model is an ``nn.Module`` holding only the maths; the training engine
(:mod:`uadct.training`) owns the loop. Subclasses register themselves by name through
``__init_subclass__``; hyper-parameters are a dataclass (``Config``) with the papers'
defaults, stored in checkpoints so a model can be rebuilt from its metadata alone.
Fitted statistics live in buffers so they travel with the weights.
"""

from __future__ import annotations

import dataclasses
import types
import typing
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
    covariates: int = 0  # subject covariate features (age, sex: uadct.covariates) the model is conditioned on; set by --covariates


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
    supports_covariates: ClassVar[bool] = False

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
        if config.covariates and not self.supports_covariates:
            raise UadctError(f"{self.name}: covariate conditioning (--covariates) is not supported by this model; "
                             f"models that support it: {', '.join(n for n, c in sorted(MODEL_REGISTRY.items()) if c.supports_covariates)}")
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

    @property
    def covariate_features(self) -> int:
        """Length of the covariate vector the hooks take (0: not conditioned on covariates)."""
        return int(self.config.covariates)

    @property
    def uses_covariates(self) -> bool:
        """Whether the hooks need ``covariates`` ``(B, config.covariates)`` (the patches' subjects' encoded covariates)."""
        return self.covariate_features > 0

    def require_covariates(self, covariates: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``covariates`` checked to be ``(batch, config.covariates)``; a one-line error when missing."""
        size = self.config.covariates
        if covariates is None:
            raise UadctError(f"{self.name}: trained with subject covariates, so they must be given (--covariates or --age/--sex)")
        if tuple(covariates.shape) != (batch, size):
            raise UadctError(f"{self.name}: covariates must be ({batch}, {size}), got {tuple(covariates.shape)}")
        return covariates

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
        positions: torch.Tensor | None = None, covariates: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One optimisation step on a batch; returns the losses as floats (key ``"loss"`` required).

        The default minimises ``training_loss()["loss"]`` with the single optimiser;
        adversarial models override it to alternate generator and discriminator updates.
        ``covariates`` (``(B, config.covariates)``) are passed on to the hooks of a model that uses them.
        """
        losses = self.training_loss(patches, masks, positions=positions, **self.covariate_options(covariates))
        optimizer = optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def validation_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
                        covariates: torch.Tensor | None = None) -> float:
        """The loss early stopping watches (eval mode, no gradients)."""
        return float(self.training_loss(patches, masks, positions=positions, **self.covariate_options(covariates))["loss"])

    def covariate_options(self, covariates: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """``{"covariates": ...}`` for a model conditioned on covariates, else nothing (the other models' hooks lack the argument)."""
        return {"covariates": covariates} if self.uses_covariates else {}

    def fit_statistics(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None,
                       covariates: torch.Tensor | None = None) -> None:
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


class CorruptionModel(AnomalyModel):
    """Hooks shared by the models whose training loss corrupts patches at random (coarse noise, synthetic
    anomalies: ``dae``, ``dae-unet``, ``synthetic-anomaly``) and whose map is one voxel score.

    ``training_loss`` takes a ``generator``; validation draws the corruption from a generator
    seeded 0, so epochs compare like with like.
    """

    def validation_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        """The training loss under corruption drawn with a fixed seed (0)."""
        generator = torch.Generator(device=patches.device).manual_seed(0)
        return float(self.training_loss(patches, masks, generator=generator)["loss"])

    @staticmethod
    def voxel_scores(voxel: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``"voxel"``: the map ``(B, 1, *patch)`` as ``(B, *patch)``, 0 outside ``masks``; ``"scalar"``: its mean ``(B,)``."""
        if masks is not None:
            voxel = voxel * masks
        return {"voxel": voxel[:, 0], "scalar": voxel.flatten(1).mean(1)}


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


def patch_models() -> list[str]:
    """Registered models that score patches through a network (every model except the voxel-wise
    ones, such as ``normative``, that fit and score whole volumes with ``fit_volumes``)."""
    return [name for name, cls in sorted(MODEL_REGISTRY.items()) if not hasattr(cls, "fit_volumes")]


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


# ------------------------------------------------------------------ model options (CLI `-O key=value`)
ENGINE_OPTIONS = ("patch_size", "dims", "in_channels", "covariates")  # set by the training engine, not by model options


@dataclasses.dataclass(frozen=True)
class ModelOption:
    """One hyper-parameter of a model: name, type (as written), default and a one-line meaning."""

    name: str
    type: str
    default: Any
    help: str


def _field_comments(config_class: type) -> dict[str, str]:
    """Trailing ``# comments`` of the dataclass fields, through the class hierarchy (subclass wins)."""
    import inspect
    import re

    comments: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (frozen install): options just lack their meaning
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE):
            comments[match.group(1)] = match.group(2).strip()
    return comments


def model_options(name: str) -> list[ModelOption]:
    """The options a model takes through ``-O key=value`` (its Config fields less the engine's)."""
    config_class = model_class(name).Config
    hints = typing.get_type_hints(config_class)
    comments = _field_comments(config_class)
    return [
        ModelOption(f.name, _type_name(hints[f.name]), f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                    comments.get(f.name, ""))
        for f in dataclasses.fields(config_class) if f.name not in ENGINE_OPTIONS
    ]


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(text: str, annotation: Any) -> Any:
    """``text`` as a value of ``annotation`` (bool, int, float, str, tuples, unions, None); ValueError if not."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in arguments and text.strip().lower() == "none":
            return None
        for option in (a for a in arguments if a is not type(None)):
            try:
                return _convert(text, option)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_convert(item, arguments[0]) for item in items)
        if arguments and len(items) != len(arguments):
            raise ValueError(text)
        return tuple(_convert(item, kind) for item, kind in zip(items, arguments or [str] * len(items)))
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered not in _TRUE + _FALSE:
            raise ValueError(text)
        return lowered in _TRUE
    if annotation in (int, float):
        return annotation(text)
    if annotation is str:
        return text
    raise ValueError(text)


def parse_model_options(name: str, items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> a config dict typed by the model's Config fields.

    Unknown keys and values of the wrong type are one-line errors naming the valid keys
    or the expected type; the engine's own settings (patch size, dims) are refused here.
    """
    options = {option.name: option for option in model_options(name)}
    hints = typing.get_type_hints(model_class(name).Config)
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UadctError(f"model option {item!r} is not key=value")
        if key in ENGINE_OPTIONS:
            raise UadctError(f"model option {key!r} is a training setting: use --{key.replace('_', '-')} instead")
        if key not in options:
            raise UadctError(f"model {name!r} has no option {key!r}; valid: {', '.join(sorted(options))}")
        try:
            parsed[key] = _convert(value, hints[key])
        except ValueError:
            raise UadctError(f"model option {key}={value!r}: expected {options[key].type}") from None
    return parsed
