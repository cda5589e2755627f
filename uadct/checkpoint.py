"""The checkpoint contract: weights plus everything needed to rebuild and run a model.

A checkpoint is a ``torch.save`` file holding only tensors and plain containers:
``{"format": str, "metadata": JSON text, "state_dict": {name: tensor}, "extra": {...}}``.
It is always read with ``torch.load(weights_only=True)``, which refuses pickled code,
so a hostile file cannot run anything. The metadata carries the model name and
hyper-parameters, patch geometry, preprocessing parameters, atlas checksum, training
history and library versions. :class:`Checkpoint` reads them through typed properties
(:attr:`~Checkpoint.patch_spec`, :attr:`~Checkpoint.preprocess_config`,
:attr:`~Checkpoint.score_scale`, ...), like nnU-Net's plans manager, so no caller walks
``metadata.get(...).get(...)`` chains.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uadct.errors import CheckpointError, UadctError
from uadct.io import atomic_path, sha256_of
from uadct.models import AnomalyModel, build_model
from uadct.patches import PatchSpec

if TYPE_CHECKING:
    from uadct.preprocess.config import PreprocessConfig

FORMAT = "uadct-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
# metadata key of the robust maximum of healthy voxel scores (see uadct.calibration);
# the name predates its general use and stays for existing checkpoints
SCORE_SCALE_KEY = "score_scale"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode) and its metadata."""

    model: AnomalyModel
    metadata: dict[str, Any]
    extra_state: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None  # of the file it was read from (outputs record which model made them)
    path: Path | None = None  # the file it was read from

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model")

    @property
    def patch_spec(self) -> PatchSpec:
        """The patch geometry the network was trained on (checked against the model config on load)."""
        patch = self.metadata.get("patch") or {}
        return PatchSpec(int(patch.get("size", 16)), int(patch.get("dims", 2)))

    @property
    def preprocess(self) -> dict[str, Any]:
        """The preprocessing parameters as stored (see :attr:`preprocess_config`)."""
        return self.metadata.get("preprocess", {})

    @property
    def preprocess_config(self) -> "PreprocessConfig":
        """The preprocessing parameters a raw scan must go through before scoring."""
        from uadct.preprocess.config import PreprocessConfig

        return PreprocessConfig.from_dict(self.preprocess)

    @property
    def atlas_sha256(self) -> str | None:
        """Checksum of the atlas the training subjects were registered to."""
        return (self.metadata.get("atlas") or {}).get("sha256")

    @property
    def score_scale(self) -> float | None:
        """Robust maximum of healthy voxel scores (:func:`uadct.calibration.estimate_score_scale`), if measured."""
        value = self.metadata.get(SCORE_SCALE_KEY)
        return float(value) if value is not None else None

    @property
    def training(self) -> dict[str, Any]:
        """The training settings and what the run did (epochs, subjects, device, seconds)."""
        return self.metadata.get("training", {})

    @property
    def training_subjects(self) -> tuple[list[str], list[str]]:
        """The training and validation subjects' ids."""
        return list(self.training.get("train_subjects", [])), list(self.training.get("validation_subjects", []))


def save_checkpoint(
    path: str | Path,
    model: AnomalyModel,
    metadata: dict[str, Any],
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write weights and metadata atomically (``extra_state``: tensors/plain data only)."""
    model = getattr(model, "scored_model", model)  # a forest-scored model: its network (the forest goes in extra_state)
    full = {"model": model.name, "model_config": model.config_dict(), **metadata}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": json.dumps(full),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra_state or {},
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # a file object, not a name: torch then names the archive "archive" instead of after the
        # (random) temporary file, so the same checkpoint is the same bytes (reproducible SHA-256)
        torch.save(payload, handle)
    return Path(path)


def read_checkpoint_payload(path: str | Path) -> dict[str, Any]:
    """Safely read a checkpoint file (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save / `uadct train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CheckpointError(f"{path}: not a checkpoint (unreadable: {_plain_first_line(exc)})") from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" such as {found.group(1)}" if found else ""
        raise CheckpointError(f"{path}: refused to load: the file holds pickled objects other than tensors{what}, "
                              "which could run code; only uadct checkpoints are read") from None
    except Exception as exc:  # any failure to parse an untrusted file is the file's problem
        raise CheckpointError(f"{path}: not a uadct checkpoint ({str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a uadct checkpoint (no '{FORMAT}' format tag)")
    version = payload.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported; this uadct reads {list(SUPPORTED_VERSIONS)}")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from a checkpoint, in eval mode on ``device``."""
    payload = read_checkpoint_payload(path)
    try:
        metadata = json.loads(payload["metadata"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: checkpoint metadata is missing or corrupt") from None
    check_metadata_types(path, metadata, payload.get("state_dict"))
    try:
        model = build_model(metadata["model"], metadata.get("model_config"))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # an unknown model name is a UadctError with the list of models
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not fit model {metadata['model']!r} ({str(exc).splitlines()[0][:160]})") from None
    _check_patch_geometry(path, metadata)
    _check_finite_weights(path, payload["state_dict"])
    model.to(device).eval()
    extra = payload.get("extra", {})
    if isinstance(extra, dict) and extra.get("forest"):  # `train --scorer forest`: the patch score is the forest's
        from uadct.forest_scorer import attach_forest

        try:
            model = attach_forest(model, extra)
        except UadctError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    return Checkpoint(model, metadata, extra, sha256_of(path), Path(path))


def _plain_first_line(exc: BaseException) -> str:
    """The first line of an exception's text without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metadata_types(path: str | Path, metadata: Any, state_dict: Any) -> None:
    """Refuse, with one line, metadata and weights of the wrong types (an edited file):
    everything the scorer reads must be what ``uadct train`` writes."""
    def refuse(what: str, found: Any) -> CheckpointError:
        return CheckpointError(f"{path}: checkpoint {what}, found {type(found).__name__} {str(found)[:60]!r}; "
                               "the file was edited or is damaged")

    if not isinstance(metadata, dict):
        raise refuse("metadata must be a JSON object", metadata)
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise refuse("state_dict must map names to tensors", state_dict)
    if not isinstance(metadata.get("model"), str):
        raise refuse("'model' must be a model name", metadata.get("model"))
    for key in ("model_config", "preprocess", "atlas", "patch"):
        if key in metadata and metadata[key] is not None and not isinstance(metadata[key], dict):
            raise refuse(f"'{key}' must be a JSON object", metadata[key])
    patch = metadata.get("patch")
    if isinstance(patch, dict):
        for key in ("size", "dims"):
            value = patch.get(key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise refuse(f"patch {key} must be a positive whole number", value)
    scale = metadata.get("score_scale")
    if scale is not None and not (_is_number(scale) and math.isfinite(scale) and scale > 0):
        raise refuse("'score_scale' must be a positive number or null", scale)


def _check_finite_weights(path: str | Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or infinity (a diverged training or an edited file): they give all-NaN maps."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: weight {name!r} holds NaN or infinite values (diverged training or an edited file); "
                                  "refusing to score with it")


def _check_patch_geometry(path: str | Path, metadata: dict[str, Any]) -> None:
    """The patch geometry the scorer will cut must be the one the network was built for."""
    patch = metadata.get("patch")
    config = metadata.get("model_config") or {}
    if not isinstance(patch, dict):
        raise CheckpointError(f"{path}: checkpoint metadata has no patch geometry ('patch': {{'size', 'dims'}})")
    for key, config_key in (("size", "patch_size"), ("dims", "dims")):
        if config_key in config and patch.get(key) != config[config_key]:
            raise CheckpointError(
                f"{path}: patch {key} {patch.get(key)!r} in the metadata disagrees with the model's {config_key} "
                f"{config[config_key]!r}; the file was edited or mixes two trainings"
            )
