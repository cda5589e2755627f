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
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uadct.errors import CheckpointError
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
    full = {"model": model.name, "model_config": model.config_dict(), **metadata}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": json.dumps(full),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra_state or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint_payload(path: str | Path) -> dict[str, Any]:
    """Safely read a checkpoint file (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors ({first[:160]})") from None
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
    model.to(device).eval()
    return Checkpoint(model, metadata, payload.get("extra", {}), sha256_of(path))


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
