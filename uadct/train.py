"""The training engine: patch sampling from prepared subjects, the fit loop, early stopping.

Subjects are split into training and validation sets by subject (never by patch).
Each epoch draws ``patches_per_epoch`` random patches with at most ``max_background``
of their voxels outside the brain mask; validation uses a fixed set of patches from
the validation subjects. The best epoch's weights are kept and written with the
metadata that scoring needs (see :mod:`uadct.checkpoint`).

Runs are reproducible: the same seed gives bit-identical weights on the same device
(deterministic algorithms, seeded samplers). After every epoch, and when SIGTERM/SIGINT
arrive (at the end of the current step), the full training state goes to
``<out>.resume.pt``; ``train_model(..., resume=True)`` continues from it and gives the
same weights as an uninterrupted run. The file is removed once the final checkpoint exists.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk
import torch

from uadct.checkpoint import save_checkpoint
from uadct.errors import UadctError
from uadct.io import atomic_path, read_mask, write_json
from uadct.models import AnomalyModel, build_model
from uadct.patches import PatchSpec, extract_patches, patch_centres, valid_training_positions
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
    exclude_labels: str | None = None  # folder of <subject>.nii.gz lesion masks on each scan's own grid
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
        images, masks, _ = self.sample_with_centres(count)
        return images, masks

    def sample_with_centres(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`sample`, plus the patch centres ``(count, 3)`` float32 in [-1, 1]
        (:func:`uadct.patches.patch_centres`; a flipped patch gets its mirrored x centre)."""
        which = self.rng.integers(0, len(self.volumes), count)
        images = np.empty((count, 1) + _patch_shape(self.spec), np.float32)
        masks = np.empty_like(images)
        centres = np.empty((count, 3), np.float32)
        for index in np.unique(which):
            rows = np.flatnonzero(which == index)
            volume = self.volumes[index]
            picks = volume.positions[self.rng.integers(0, len(volume.positions), len(rows))]
            images[rows, 0] = extract_patches(volume.image, picks, self.spec)
            masks[rows, 0] = extract_patches(volume.mask, picks, self.spec)
            centres[rows] = patch_centres(picks, self.spec, volume.image.shape)
        if self.flip:
            flipped = self.rng.random(count) < 0.5
            images[flipped] = images[flipped][..., ::-1]
            masks[flipped] = masks[flipped][..., ::-1]
            centres[flipped, 2] *= -1.0
        return images, masks, centres

    def rng_state(self) -> str:
        """The random state as JSON text (its 128-bit integers survive ``weights_only`` loads)."""
        return json.dumps(self.rng.bit_generator.state)

    def restore_rng_state(self, state: str) -> None:
        """Continue the random stream saved by :meth:`rng_state`."""
        self.rng.bit_generator.state = json.loads(state)


class TrainingInterrupted(UadctError):
    """SIGTERM/SIGINT stopped training; the resume checkpoint has been written."""


RESUME_FORMAT = "uadct-resume"
RESUME_VERSION = 1
# config fields that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = ("max_epochs", "patience", "device")


def resume_path(out_path: str | Path) -> Path:
    """Where the training state of the run writing ``out_path`` is kept."""
    return Path(str(out_path) + ".resume.pt")


def _config_signature(config: TrainConfig) -> str:
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    return json.dumps({k: v for k, v in fields.items() if k not in _RESUMABLE_CHANGES}, sort_keys=True)


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


@dataclass
class _LoopState:
    """Where the fit loop stands: the next (epoch, step) to run and what early stopping knows."""

    epoch: int = 0
    step: int = 0
    partial_train_loss: float = 0.0
    best_loss: float = float("inf")
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    waited: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _save_resume(
    path: Path, config: TrainConfig, model: AnomalyModel, optimizers: dict[str, torch.optim.Optimizer],
    sampler: PatchSampler, state: _LoopState,
) -> None:
    """Write everything needed to continue bit-identically (tensors and plain data only)."""
    payload = {
        "format": RESUME_FORMAT,
        "format_version": RESUME_VERSION,
        "config": _config_signature(config),
        "model": _cpu_state(model.state_dict()),
        "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
        "best_state": _cpu_state(state.best_state) if state.best_state is not None else {},
        "epoch": state.epoch,
        "step": state.step,
        "partial_train_loss": state.partial_train_loss,
        "best_loss": state.best_loss,
        "best_epoch": state.best_epoch,
        "waited": state.waited,
        "history": json.dumps(state.history),
        "sampler_rng": sampler.rng_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_resume(
    path: Path, config: TrainConfig, model: AnomalyModel, optimizers: dict[str, torch.optim.Optimizer],
    sampler: PatchSampler, device: torch.device,
) -> _LoopState:
    """Restore model, optimisers, random streams and loop position from a resume file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unreadable file is the file's problem, not a bug
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UadctError(f"{path}: not a readable uadct resume file ({first}); delete it to start afresh") from None
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT or payload.get("format_version") != RESUME_VERSION:
        raise UadctError(f"{path}: not a uadct resume file (format {RESUME_FORMAT!r} version {RESUME_VERSION} expected)")
    if payload["config"] != _config_signature(config):
        raise UadctError(f"{path}: was written with other training settings ({payload['config']}) than now "
                         f"({_config_signature(config)}); only {', '.join(_RESUMABLE_CHANGES)} may change on --resume")
    model.load_state_dict(payload["model"])
    if set(payload["optimizers"]) != set(optimizers):
        raise UadctError(f"{path}: holds optimisers {sorted(payload['optimizers'])}, the model has {sorted(optimizers)}")
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(payload["optimizers"][name])
    sampler.restore_rng_state(payload["sampler_rng"])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    best = payload["best_state"]
    return _LoopState(
        epoch=int(payload["epoch"]), step=int(payload["step"]), partial_train_loss=float(payload["partial_train_loss"]),
        best_loss=float(payload["best_loss"]), best_epoch=int(payload["best_epoch"]),
        best_state={k: v.to(device) for k, v in best.items()} if best else None,
        waited=int(payload["waited"]), history=json.loads(payload["history"]),
    )


class _StopRequest:
    """Set by SIGTERM/SIGINT while training; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping at the end of this step", self.signal_name)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """Catch SIGTERM/SIGINT (main thread only) and restore the original handlers afterwards."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels where torch has them (warns where it has not); restored afterwards."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


def write_history_csv(history: list[dict[str, float]], path: str | Path) -> Path:
    """The per-epoch losses as CSV (one row per epoch), written atomically."""
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns or ["epoch"])
            writer.writeheader()
            writer.writerows(history)
    return Path(path)


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


def load_volumes(
    subject_dirs: list[Path],
    spec: PatchSpec,
    max_background: float,
    exclude_labels: str | Path | None = None,
) -> tuple[list[SubjectVolume], dict[str, Any]]:
    """Read prepared subjects; all must share preprocessing parameters and atlas.

    With ``exclude_labels``, a subject that has ``<subject>.nii.gz`` there (a lesion mask
    on its own scan's grid) contributes only patches that do not overlap the lesion.
    """
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
        lesion = _lesion_on_atlas_grid(prepared, exclude_labels) if exclude_labels else None
        positions = valid_training_positions(mask, spec, max_background, exclude=lesion)
        volumes.append(SubjectVolume(prepared.subject, image, mask, positions))
    assert reference is not None
    return volumes, reference


def _lesion_on_atlas_grid(prepared: Any, labels_dir: str | Path) -> np.ndarray | None:
    """A subject's lesion mask carried onto the atlas grid (any partial overlap counts)."""
    candidates = [Path(labels_dir) / f"{prepared.subject}{suffix}" for suffix in (".nii.gz", ".nii")]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return None
    label = read_mask(path, reference=prepared.native_reference)
    warped = sitk.Resample(sitk.Cast(label, sitk.sitkFloat32), prepared.image, prepared.atlas_to_subject,
                           sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(warped) > 0


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
    resume: bool = False,
) -> TrainResult:
    """Fit a model on the prepared subjects of ``prep_dir`` and write its checkpoint.

    ``resume``: continue from ``<out>.resume.pt`` when it exists (else start afresh).
    Raises :class:`TrainingInterrupted` after writing that file when SIGTERM/SIGINT arrive.
    """
    config = config or TrainConfig()
    with _deterministic():
        return _train(prep_dir, Path(out_path), config, progress, resume)


def _train(
    prep_dir: str | Path,
    out_path: Path,
    config: TrainConfig,
    progress: Callable[[str, dict[str, Any]], None] | None,
    resume: bool,
) -> TrainResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    subjects = find_prepared(prep_dir)
    if not subjects:
        raise UadctError(f"{prep_dir}: no prepared subjects (run `uadct preprocess` first)")
    spec = PatchSpec(config.patch_size, config.dims)
    train_dirs, val_dirs = split_subjects(subjects, config.validation_fraction, config.seed)
    train_volumes, signature = load_volumes(train_dirs, spec, config.max_background, config.exclude_labels)
    val_volumes, val_signature = load_volumes(val_dirs, spec, config.max_background, config.exclude_labels)
    if val_signature != signature:
        raise UadctError(f"{prep_dir}: subjects were preprocessed with different parameters; preprocess all subjects alike")
    device = resolve_device(config.device)
    model = build_model(config.model, {"patch_size": config.patch_size, "dims": config.dims, **config.model_options}).to(device)
    optimizers = model.configure_optimizers(config.learning_rate)
    sampler = PatchSampler(train_volumes, spec, seed=config.seed, flip="flip" in config.augment)
    val_images, val_masks, val_centres = PatchSampler(val_volumes, spec, seed=config.seed + 1).sample_with_centres(config.validation_patches)

    state = _LoopState()
    resume_file = resume_path(out_path)
    if resume and resume_file.is_file():
        state = _load_resume(resume_file, config, model, optimizers, sampler, device)
        log.info("resuming %s at epoch %d step %d", resume_file, state.epoch, state.step)
    elif resume:
        log.info("%s: no resume file, starting afresh", resume_file)
    steps = max(1, config.patches_per_epoch // config.batch_size)
    # models without parameters (threshold, ocsvm) are fitted by fit_statistics alone
    trainable = any(p.requires_grad for p in model.parameters())
    if not trainable:
        state.best_loss = evaluate_loss(model, val_images, val_masks, config.batch_size, device, val_centres)
        state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def save_state() -> None:
        _save_resume(resume_file, config, model, optimizers, sampler, state)

    with _stop_on_signals() as stop:
        while trainable and state.epoch < config.max_epochs and state.waited < config.patience:
            _run_epoch(model, optimizers, sampler, (val_images, val_masks, val_centres), config, steps, device, state, progress, stop, save_state)
            if stop:
                save_state()
                where = f"epoch {state.epoch}" + (f" step {state.step}" if state.step else "")
                raise TrainingInterrupted(f"{out_path}: {stop.signal_name} received, interrupted at {where}; "
                                          f"state saved to {resume_file}; resume with --resume")
    history, best_epoch, best_loss = state.history, state.best_epoch, state.best_loss
    assert state.best_state is not None
    model.load_state_dict(state.best_state)
    model.eval()
    statistics_images, statistics_masks, statistics_centres = sampler.sample_with_centres(config.statistics_patches)
    with torch.no_grad():
        model.fit_statistics(torch.from_numpy(statistics_images).to(device), torch.from_numpy(statistics_masks).to(device),
                             **_positions(model, statistics_centres, device))
    from uadct.scoring import MOOD_SCALE_KEY, estimate_score_scale

    score_scale = estimate_score_scale(model, val_images, val_masks, config.batch_size, device, centres=val_centres)
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
        MOOD_SCALE_KEY: score_scale,
    }
    checkpoint = save_checkpoint(out_path, model.cpu(), metadata)
    write_json(history, Path(str(out_path) + ".history.json"))
    write_history_csv(history, Path(str(out_path) + ".history.csv"))
    resume_file.unlink(missing_ok=True)
    return TrainResult(
        checkpoint, history, best_epoch, best_loss,
        [v.subject for v in train_volumes], [v.subject for v in val_volumes], seconds,
    )


def _run_epoch(
    model: AnomalyModel,
    optimizers: dict[str, torch.optim.Optimizer],
    sampler: PatchSampler,
    validation: tuple[np.ndarray, np.ndarray, np.ndarray],
    config: TrainConfig,
    steps: int,
    device: torch.device,
    state: _LoopState,
    progress: Callable[[str, dict[str, Any]], None] | None,
    stop: _StopRequest,
    save_state: Callable[[], None],
) -> None:
    """Run epoch ``state.epoch`` from step ``state.step``; returns early (mid-epoch) when ``stop`` is set.

    A finished epoch is recorded in the history, updates early stopping and is saved to the
    resume file; ``state`` then points at the next epoch.
    """
    epoch = state.epoch
    model.train()
    epoch_start = time.perf_counter()
    first_step = state.step
    for step in range(first_step, steps):
        images, masks, centres = sampler.sample_with_centres(config.batch_size)
        losses = model.training_step(torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device), optimizers,
                                     **_positions(model, centres, device))
        state.partial_train_loss += losses["loss"] / steps
        state.step = step + 1
        if progress is not None:
            progress("step", {"epoch": epoch, "step": step + 1, "steps": steps, "loss": losses["loss"]})
        if stop and state.step < steps:
            return
    val_loss = evaluate_loss(model, validation[0], validation[1], config.batch_size, device, validation[2])
    seconds = time.perf_counter() - epoch_start
    record = {
        "epoch": epoch,
        "train_loss": state.partial_train_loss,
        "validation_loss": val_loss,
        "seconds": round(seconds, 3),
        "patches_per_second": round((steps - first_step) * config.batch_size / max(seconds, 1e-9), 1),
    }
    state.history.append(record)
    if val_loss < state.best_loss:
        state.best_loss, state.best_epoch, state.waited = val_loss, epoch, 0
        state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        state.waited += 1
    if state.waited >= config.patience:
        _advance_stage(model, state)
    state.epoch, state.step, state.partial_train_loss = epoch + 1, 0, 0.0
    save_state()
    if progress is not None:
        progress("epoch", {**record, "best_epoch": state.best_epoch})
    if state.waited >= config.patience:
        log.info("early stop at epoch %d (best %d)", epoch, state.best_epoch)


def _advance_stage(model: AnomalyModel, state: _LoopState) -> None:
    """Growing models (progressive GANs): where early stopping would end training, reload
    the stage's best weights and ask the model for its next stage. If it has one, the
    patience and the best loss start afresh (a new stage has a new loss scale), so only
    the last stage's best epoch is kept; the jump is marked in the history."""
    last = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    if not model.advance_stage():
        model.load_state_dict(last)  # no further stage: the loop ends as it always did
        return
    log.info("epoch %d: %s advanced to its next stage", state.epoch, model.name)
    state.history[-1]["stage_advanced"] = 1
    state.best_loss, state.waited = float("inf"), 0
    # until the new stage has an epoch of its own, the best model is the previous stage's best, grown
    state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _positions(model: AnomalyModel, centres: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """``{"positions": (B, 3) tensor}`` for models conditioned on the patch position, else ``{}``."""
    return {"positions": torch.from_numpy(centres).to(device)} if model.uses_positions else {}


@torch.no_grad()
def evaluate_loss(
    model: AnomalyModel, images: np.ndarray, masks: np.ndarray, batch_size: int, device: torch.device,
    centres: np.ndarray | None = None,
) -> float:
    """Mean training loss over a fixed set of patches, in eval mode (``centres``: their positions)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        m = torch.from_numpy(masks[start : start + batch_size]).to(device)
        extra = _positions(model, centres[start : start + batch_size], device) if centres is not None else {}
        total += model.validation_loss(x, m, **extra) * len(x)
        count += len(x)
    return total / max(1, count)
