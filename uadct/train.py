"""The training engine: patch sampling from prepared subjects, the fit loop, early stopping.

Subjects are split into training and validation sets by subject (never by patch).
Each epoch draws ``patches_per_epoch`` random patches with at most ``max_background``
of their voxels outside the brain mask; validation uses a fixed set of patches from
the validation subjects. The best epoch's weights are kept and written with the
metadata that scoring needs (see :mod:`uadct.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from uadct.checkpoint import save_checkpoint
from uadct.errors import UadctError
from uadct.io import write_json
from uadct.models import AnomalyModel, build_model
from uadct.patches import PatchSpec, extract_patches, valid_training_positions
from uadct.preprocess.pipeline import find_prepared, library_versions, load_prepared

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Training hyper-parameters (defaults follow the papers where they say)."""

    model: str = "cae"
    patch_size: int = 16
    dims: int = 2
    batch_size: int = 128
    learning_rate: float = 1e-3
    max_epochs: int = 50
    patience: int = 10
    patches_per_epoch: int = 8192
    validation_patches: int = 2048
    validation_fraction: float = 0.2
    statistics_patches: int = 4096
    max_background: float = 0.5
    augment: tuple[str, ...] = ("flip",)
    seed: int = 0
    device: str = "auto"
    model_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SubjectVolume:
    """A prepared subject's arrays ``(D, H, W)`` and its valid training positions."""

    subject: str
    image: np.ndarray
    mask: np.ndarray
    positions: np.ndarray


class PatchSampler:
    """Draws random training patches (with their masks) from several subjects."""

    def __init__(self, volumes: list[SubjectVolume], spec: PatchSpec, seed: int = 0, flip: bool = False) -> None:
        usable = [v for v in volumes if len(v.positions)]
        if not usable:
            raise UadctError("no subject has a patch with enough brain in it; check the masks and the patch size")
        self.volumes = usable
        self.spec = spec
        self.flip = flip
        self.rng = np.random.default_rng(seed)

    def sample(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` patches and masks, each ``(count, 1, *patch)`` float32."""
        which = self.rng.integers(0, len(self.volumes), count)
        images = np.empty((count, 1) + _patch_shape(self.spec), np.float32)
        masks = np.empty_like(images)
        for index in np.unique(which):
            rows = np.flatnonzero(which == index)
            volume = self.volumes[index]
            picks = volume.positions[self.rng.integers(0, len(volume.positions), len(rows))]
            images[rows, 0] = extract_patches(volume.image, picks, self.spec)
            masks[rows, 0] = extract_patches(volume.mask, picks, self.spec)
        if self.flip:
            flipped = self.rng.random(count) < 0.5
            images[flipped] = images[flipped][..., ::-1]
            masks[flipped] = masks[flipped][..., ::-1]
        return images, masks


def _patch_shape(spec: PatchSpec) -> tuple[int, ...]:
    return (spec.size, spec.size) if spec.dims == 2 else (spec.size,) * 3


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def load_volumes(subject_dirs: list[Path], spec: PatchSpec, max_background: float) -> tuple[list[SubjectVolume], dict[str, Any]]:
    """Read prepared subjects; all must share preprocessing parameters and atlas."""
    volumes: list[SubjectVolume] = []
    reference: dict[str, Any] | None = None
    for folder in subject_dirs:
        prepared = load_prepared(folder)
        signature = {"config": prepared.sidecar.get("config"), "atlas": prepared.sidecar.get("atlas")}
        if reference is None:
            reference = signature
        elif signature != reference:
            raise UadctError(f"{folder}: preprocessed with other parameters or atlas than {subject_dirs[0]}; preprocess all subjects alike")
        image = sitk.GetArrayFromImage(prepared.image).astype(np.float32)
        mask = (sitk.GetArrayFromImage(prepared.mask) > 0).astype(np.float32)
        positions = valid_training_positions(mask, spec, max_background)
        volumes.append(SubjectVolume(prepared.subject, image, mask, positions))
    assert reference is not None
    return volumes, reference


def split_subjects(subjects: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split by subject: at least one in each set when there are two or more."""
    if len(subjects) < 2:
        raise UadctError(f"need at least 2 prepared subjects to train with a validation split, found {len(subjects)}")
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = min(len(subjects) - 1, max(1, int(round(fraction * len(subjects)))))
    val = sorted(subjects[i] for i in order[:n_val])
    train = sorted(subjects[i] for i in order[n_val:])
    return train, val


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_validation_loss: float
    train_subjects: list[str]
    validation_subjects: list[str]
    seconds: float


def train_model(
    prep_dir: str | Path,
    out_path: str | Path,
    config: TrainConfig | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fit a model on the prepared subjects of ``prep_dir`` and write its checkpoint."""
    config = config or TrainConfig()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    subjects = find_prepared(prep_dir)
    if not subjects:
        raise UadctError(f"{prep_dir}: no prepared subjects (run `uadct preprocess` first)")
    spec = PatchSpec(config.patch_size, config.dims)
    train_dirs, val_dirs = split_subjects(subjects, config.validation_fraction, config.seed)
    train_volumes, signature = load_volumes(train_dirs, spec, config.max_background)
    val_volumes, val_signature = load_volumes(val_dirs, spec, config.max_background)
    if val_signature != signature:
        raise UadctError(f"{prep_dir}: subjects were preprocessed with different parameters; preprocess all subjects alike")
    device = resolve_device(config.device)
    model = build_model(config.model, {"patch_size": config.patch_size, "dims": config.dims, **config.model_options}).to(device)
    optimizers = model.configure_optimizers(config.learning_rate)
    sampler = PatchSampler(train_volumes, spec, seed=config.seed, flip="flip" in config.augment)
    val_images, val_masks = PatchSampler(val_volumes, spec, seed=config.seed + 1).sample(config.validation_patches)

    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, waited = float("inf"), -1, None, 0
    steps = max(1, config.patches_per_epoch // config.batch_size)
    # models without parameters (threshold, ocsvm) are fitted by fit_statistics alone
    trainable = any(p.requires_grad for p in model.parameters())
    if not trainable:
        best_loss = evaluate_loss(model, val_images, val_masks, config.batch_size, device)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for epoch in range(config.max_epochs if trainable else 0):
        model.train()
        epoch_start = time.perf_counter()
        train_loss = 0.0
        for step in range(steps):
            images, masks = sampler.sample(config.batch_size)
            losses = model.training_step(torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device), optimizers)
            train_loss += losses["loss"] / steps
            if progress is not None:
                progress("step", {"epoch": epoch, "step": step + 1, "steps": steps, "loss": losses["loss"]})
        val_loss = evaluate_loss(model, val_images, val_masks, config.batch_size, device)
        seconds = time.perf_counter() - epoch_start
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "validation_loss": val_loss,
            "seconds": round(seconds, 3),
            "patches_per_second": round(steps * config.batch_size / seconds, 1),
        }
        history.append(record)
        if val_loss < best_loss:
            best_loss, best_epoch, waited = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
        if progress is not None:
            progress("epoch", {**record, "best_epoch": best_epoch})
        if waited >= config.patience:
            log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    statistics_images, statistics_masks = sampler.sample(config.statistics_patches)
    with torch.no_grad():
        model.fit_statistics(torch.from_numpy(statistics_images).to(device), torch.from_numpy(statistics_masks).to(device))
    seconds = time.perf_counter() - started
    metadata = {
        "patch": {"size": spec.size, "dims": spec.dims},
        "preprocess": signature["config"],
        "atlas": signature["atlas"],
        "training": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
            "best_epoch": best_epoch,
            "best_validation_loss": best_loss,
            "epochs_run": len(history),
            "train_subjects": [v.subject for v in train_volumes],
            "validation_subjects": [v.subject for v in val_volumes],
            "seconds": round(seconds, 1),
            "device": str(device),
        },
        "history": history,
        "versions": library_versions(),
    }
    checkpoint = save_checkpoint(out_path, model.cpu(), metadata)
    write_json(history, Path(str(out_path) + ".history.json"))
    return TrainResult(
        checkpoint, history, best_epoch, best_loss,
        [v.subject for v in train_volumes], [v.subject for v in val_volumes], seconds,
    )


@torch.no_grad()
def evaluate_loss(model: AnomalyModel, images: np.ndarray, masks: np.ndarray, batch_size: int, device: torch.device) -> float:
    """Mean training loss over a fixed set of patches, in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        m = torch.from_numpy(masks[start : start + batch_size]).to(device)
        total += model.validation_loss(x, m) * len(x)
        count += len(x)
    return total / max(1, count)
