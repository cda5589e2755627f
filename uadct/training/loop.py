"""The fit loop: early stopping, growing models, statistics, score scale and the checkpoint.

The best epoch's weights are kept and written with the metadata that scoring needs
(see :mod:`uadct.checkpoint`). Runs are reproducible: the same seed gives bit-identical
weights on the same device (deterministic algorithms, counter-seeded batches from
:mod:`uadct.training.data`), with or without workers, and after a resume
(:mod:`uadct.training.resume`). Mixed precision: bfloat16 ``torch.autocast`` around the
models' ``training_step`` hooks (:mod:`uadct.device`). Several processes (torchrun): see
:mod:`uadct.training.distributed`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from uadct.augment import ContrastAugmenter
from uadct.calibration import estimate_score_scale
from uadct.checkpoint import SCORE_SCALE_KEY, save_checkpoint
from uadct.device import autocast, resolve_device, use_amp
from uadct.errors import UadctError
from uadct.io import atomic_path, library_versions, write_json
from uadct.memory import BatchPlan, available_memory, plan_batch, training_memory
from uadct.models import AnomalyModel, build_model
from uadct.patches import PatchSpec, patch_centres
from uadct.preprocess.prepared import PreparedFolder, find_prepared
from uadct.preprocess.resolution import training_resolution
from uadct.training.config import AUGMENTATIONS, TrainConfig
from uadct.training.data import PatchSampler, default_workers, epoch_batches, load_volumes, split_subjects
from uadct.training.distributed import AveragedOptimizer, Distributed, distributed_from_environment
from uadct.training.resume import (LoopState, StopRequest, TrainingInterrupted, load_resume, read_resume, resume_path,
                                   save_resume, stop_on_signals)

log = logging.getLogger(__name__)


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
    resume: bool | None = None,
    max_memory: int | None = None,
) -> TrainResult:
    """Fit a model on the prepared subjects of ``prep_dir`` and write its checkpoint.

    ``max_memory``: bytes one training process may use for the model, its optimiser
    states and a batch (default: 90 % of the free memory of the device); a batch that
    cannot fit is a :class:`uadct.memory.MemoryLimitError` before training starts.

    ``resume``: ``None`` (default) or ``True`` continue from ``<out>.resume.pt`` when it
    exists and was written with the same settings (a file from other settings is an
    error that says which differ); ``False`` starts afresh and replaces it.
    Raises :class:`TrainingInterrupted` after writing that file when SIGTERM/SIGINT arrive.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) every process calls this; they
    share the work of each global batch, average gradients, take the same
    early-stopping decisions, and only rank 0 writes files.
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    distributed, device, created = distributed_from_environment(device)
    try:
        with _deterministic():
            return _train(prep_dir, Path(out_path), config, progress, resume, device, distributed, max_memory)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


@dataclass
class _Run:
    """What the fit loop works with (fixed for the run)."""

    model: AnomalyModel
    optimizers: dict[str, Any]  # as the model's hooks see them (gradient-averaging under torchrun)
    sampler: PatchSampler
    validation: tuple[np.ndarray, ...]  # images, masks, starts (and covariates, when the run has them)
    config: TrainConfig
    steps: int
    device: torch.device
    workers: int
    amp: bool
    distributed: Distributed
    volume_shape: tuple[int, int, int]


def _hook_options(run: _Run, starts: torch.Tensor | np.ndarray, covariates: Any = None) -> dict[str, Any]:
    """``positions=`` (the centres of the patches at ``starts``) and ``covariates=`` (their subjects'
    covariates ``(B, K)``) for models that are conditioned on them."""
    options: dict[str, Any] = {}
    if run.model.uses_positions:
        centres = patch_centres(np.asarray(starts), run.sampler.spec, run.volume_shape)
        options["positions"] = torch.from_numpy(centres).to(run.device)
    if run.model.uses_covariates:
        if covariates is None:
            raise UadctError(f"{run.model.name}: conditioned on covariates, but the patches came without them")
        options["covariates"] = torch.as_tensor(np.asarray(covariates), dtype=torch.float32).to(run.device)
    return options


def _rows_options(run: _Run, drawn: tuple[np.ndarray, ...], rows: Any) -> dict[str, Any]:
    """:func:`_hook_options` for rows ``rows`` (a slice or indices) of a draw ``(images, masks, starts[, covariates])``."""
    return _hook_options(run, drawn[2][rows], drawn[3][rows] if len(drawn) > 3 else None)


TRAINING_SHARE_OF_FREE_MEMORY = 0.9


def check_training_memory(model: AnomalyModel, spec: PatchSpec, config: TrainConfig, device: torch.device,
                          processes: int = 1, max_memory: int | None = None) -> BatchPlan:
    """Refuse a batch that cannot fit before training starts (instead of an out-of-memory kill).

    Each process trains on ``batch_size / processes`` patches; its need is measured by
    :func:`uadct.memory.training_memory` (activations per patch, weights, gradients and
    optimiser states), plus the validation patches it keeps.
    """
    shape = spec.tensor_shape
    extra = {"positions": torch.zeros((4, 3), device=device)} if model.uses_positions else {}
    if model.uses_covariates:
        extra["covariates"] = torch.zeros((4, model.covariate_features), device=device)
    per_patch, fixed = training_memory(model, shape, device, config.learning_rate, extra)
    fixed += 3 * 4 * config.validation_patches * int(np.prod(shape))  # validation images, masks, starts
    budget = max_memory if max_memory is not None else int(TRAINING_SHARE_OF_FREE_MEMORY * available_memory(device))
    plan = plan_batch(config.batch_size // max(1, processes), per_patch, fixed, budget, "training")
    log.info("training memory: %s", plan.describe())
    return plan


def _train(
    prep_dir: str | Path,
    out_path: Path,
    config: TrainConfig,
    progress: Callable[[str, dict[str, Any]], None] | None,
    resume: bool | None,
    device: torch.device,
    distributed: Distributed,
    max_memory: int | None = None,
) -> TrainResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    unknown = set(config.augment) - set(AUGMENTATIONS)
    if unknown:
        raise UadctError(f"unknown augmentation {sorted(unknown)}; available: {', '.join(AUGMENTATIONS)}")
    if config.batch_size % distributed.world_size:
        raise UadctError(f"batch size {config.batch_size} is not divisible by the {distributed.world_size} training processes")
    subjects = find_prepared(prep_dir)
    if not subjects:
        raise UadctError(f"{prep_dir}: no prepared subjects (run `uadct preprocess` first)")
    spec = PatchSpec(config.patch_size, config.dims)
    train_dirs, val_dirs = split_subjects(subjects, config.validation_fraction, config.seed)
    gmm = "gmm" in config.augment
    train_volumes, signature = load_volumes(train_dirs, spec, config.max_background, config.exclude_labels, tissue_models=gmm)
    val_volumes, val_signature = load_volumes(val_dirs, spec, config.max_background, config.exclude_labels)
    if val_signature != signature:
        raise UadctError(f"{prep_dir}: subjects were preprocessed with different parameters; preprocess all subjects alike")
    normalization = (signature["config"] or {}).get("normalization", "percentile")
    augmenter = ContrastAugmenter(normalization=normalization).fit([v.tissue.theta for v in train_volumes if v.tissue is not None]) if gmm else None
    encoding = None
    if config.covariates:  # subject covariates from a participants TSV (uadct.covariates)
        from uadct.covariates import attach_training_covariates, covariate_model_option

        encoding = attach_training_covariates(config.covariates, config.covariate_columns, train_volumes, val_volumes)
    model = build_model(config.model, {"patch_size": config.patch_size, "dims": config.dims, **config.model_options,
                                       **(covariate_model_option(config.model, config.scorer, encoding) if encoding else {})}).to(device)
    if config.scorer not in ("model", "forest"):
        raise UadctError(f"unknown scorer {config.scorer!r}; expected model or forest")
    if config.scorer == "forest":
        from uadct.forest_scorer import require_encoder

        require_encoder(model)
    check_training_memory(model, spec, config, device, distributed.world_size, max_memory)
    optimizers = model.configure_optimizers(config.learning_rate)
    sampler = PatchSampler(train_volumes, spec, seed=config.seed, flip="flip" in config.augment, augmenter=augmenter)
    validation = PatchSampler(val_volumes, spec, seed=config.seed + 1).sample(config.validation_patches)
    if distributed.rank:  # own dropout/noise streams per process; rank 0 keeps the single-process stream
        torch.manual_seed(config.seed + 1_000_003 * distributed.rank)
    workers = config.workers if config.workers is not None else default_workers(device, distributed.local_world_size)
    amp = use_amp(config.amp, device)
    hooks_optimizers: dict[str, Any] = (
        {name: AveragedOptimizer(o, distributed.world_size) for name, o in optimizers.items()} if distributed.enabled else optimizers
    )
    run = _Run(model, hooks_optimizers, sampler, validation, config, max(1, config.patches_per_epoch // config.batch_size),
               device, workers, amp, distributed, tuple(train_volumes[0].image.shape))

    state = LoopState()
    resume_file = resume_path(out_path)
    if distributed.is_main:  # temporary files of a killed run's atomic writes (never a finished file)
        for stale in out_path.parent.glob(f".{out_path.name}.*.tmp*"):
            stale.unlink(missing_ok=True)
    if resume is not False and resume_file.is_file():
        state = load_resume(read_resume(resume_file, config), resume_file, model, optimizers, device, distributed)
        log.info("resuming %s at epoch %d step %d", resume_file, state.epoch, state.step)
        if progress is not None and distributed.is_main:
            progress("resume", {"path": str(resume_file), "epoch": state.epoch, "step": state.step})
    elif resume is False and resume_file.is_file():
        log.info("%s: starting afresh (the interrupted run's state will be replaced)", resume_file)
        if distributed.is_main:
            resume_file.unlink(missing_ok=True)
    distributed.barrier()
    distributed.broadcast_state(model)  # identical start on every process
    log.info("training on %s: %d process(es), %d sampling worker(s) each, amp %s", device, distributed.world_size, workers,
             "bfloat16" if amp else "off")
    # models without parameters (threshold, ocsvm) are fitted by fit_statistics alone
    trainable = any(p.requires_grad for p in model.parameters())
    if not trainable:
        state.best_loss = evaluate_loss(model, validation[0], validation[1], config.batch_size, device)
        state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def save_state() -> None:
        save_resume(resume_file, config, model, optimizers, state, distributed)

    with stop_on_signals() as stop:
        while trainable and state.epoch < config.max_epochs and state.waited < config.patience:
            stopped = _run_epoch(run, state, progress, stop, save_state)
            if stopped:
                save_state()
                where = f"epoch {state.epoch}" + (f" step {state.step}" if state.step else "")
                reason = stop.signal_name or "a signal to another training process"
                raise TrainingInterrupted(f"{out_path}: {reason} received, interrupted at {where}; "
                                          f"state saved to {resume_file}; run the same command again to resume")
    history, best_epoch, best_loss = state.history, state.best_epoch, state.best_loss
    assert state.best_state is not None
    model.load_state_dict(state.best_state)
    model.eval()
    seconds = time.perf_counter() - started
    train_names, val_names = [v.subject for v in train_volumes], [v.subject for v in val_volumes]
    if distributed.is_main:
        statistics = sampler.sample(config.statistics_patches)
        with torch.no_grad():
            model.fit_statistics(torch.from_numpy(statistics[0]).to(device), torch.from_numpy(statistics[1]).to(device),
                                 **_rows_options(run, statistics, slice(None)))
        scoring_model, extra_state = model, {}
        if config.scorer == "forest":  # the patch score becomes a forest's anomaly probability on the latent features
            from uadct.forest_scorer import ForestSettings, fit_forest_scorer

            settings = ForestSettings(config.forest_model, config.forest_trees, config.forest_patches, config.seed)
            scoring_model, extra_state, forest_record = fit_forest_scorer(
                model, sampler.sample(config.forest_patches), validation, settings, device, encoding.names if encoding else None)
        if hasattr(model, "fit_volumes"):  # voxel-wise models (normative) fit and calibrate on whole volumes
            from uadct.training_volumes import fit_volume_model

            score_scale = fit_volume_model(model, train_volumes, val_volumes, train_dirs, val_dirs, config.exclude_labels)
        else:
            score_scale = estimate_score_scale(scoring_model, validation[0], validation[1], config.batch_size, device,
                                               hook_options=lambda rows: _scoring_options(run, scoring_model, validation, rows))
        calibration = []
        if config.calibration_subjects > 0:  # maps of whole held-out healthy subjects -> calibrated units, FPR thresholds
            from uadct.calibrate_maps import calibrate_trained_model
            from uadct.covariates import training_source

            source = training_source(config.covariates, encoding) if encoding is not None and config.covariates else None
            calibration = [calibrate_trained_model(scoring_model, {"size": spec.size, "dims": spec.dims}, val_dirs[: config.calibration_subjects],
                                                   config.exclude_labels, str(device), source).to_dict()]
        seconds = time.perf_counter() - started
        metadata = {
            "patch": {"size": spec.size, "dims": spec.dims},
            "preprocess": signature["config"],
            "atlas": signature["atlas"],
            "resolution": training_resolution([PreparedFolder(f).sidecar for f in [*train_dirs, *val_dirs]]),
            "training": {
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
                "best_epoch": best_epoch,
                "best_validation_loss": best_loss,
                "epochs_run": len(history),
                "train_subjects": train_names,
                "validation_subjects": val_names,
                "seconds": round(seconds, 1),
                "device": str(device),
                "processes": distributed.world_size,
                "workers": workers,
                "amp": "bfloat16" if amp else None,
            },
            "history": history,
            "versions": library_versions(),
            SCORE_SCALE_KEY: score_scale,
            "calibration": calibration,
        }
        if encoding is not None:
            metadata["covariates"] = encoding.to_dict()
        if config.scorer == "forest":
            metadata["forest"] = forest_record
        save_checkpoint(out_path, model.cpu(), metadata, extra_state)
        write_json(history, Path(str(out_path) + ".history.json"))
        write_history_csv(history, Path(str(out_path) + ".history.csv"))
        resume_file.unlink(missing_ok=True)
    distributed.barrier()
    return TrainResult(out_path, history, best_epoch, best_loss, train_names, val_names, seconds)


def _scoring_options(run: _Run, scorer: Any, drawn: tuple[np.ndarray, ...], rows: Any) -> dict[str, Any]:
    """:func:`_rows_options`, plus the covariates for a scorer that takes them (a forest fitted with covariates)."""
    options = _rows_options(run, drawn, rows)
    if getattr(scorer, "uses_covariates", False) and len(drawn) > 3:
        options["covariates"] = torch.as_tensor(drawn[3][rows], dtype=torch.float32).to(run.device)
    return options


def _run_epoch(
    run: _Run,
    state: LoopState,
    progress: Callable[[str, dict[str, Any]], None] | None,
    stop: StopRequest,
    save_state: Callable[[], None],
) -> bool:
    """Run epoch ``state.epoch`` from step ``state.step``; returns True when stopped mid-epoch by a signal.

    A finished epoch is recorded in the history, updates early stopping (on the
    validation loss averaged over all processes) and is saved to the resume file;
    ``state`` then points at the next epoch.
    """
    config, distributed, device = run.config, run.distributed, run.device
    epoch, steps = state.epoch, run.steps
    run.model.train()
    epoch_start = time.perf_counter()
    first_step = state.step
    batches = epoch_batches(run.sampler, epoch, first_step, steps, config.batch_size, run.workers,
                            distributed.rank, distributed.world_size, pin_memory=device.type == "cuda")
    try:
        for step, (images, masks, starts, *covariates) in enumerate(batches, start=first_step):
            x = images.to(device, non_blocking=True)
            m = masks.to(device, non_blocking=True)
            with autocast(device, run.amp):
                losses = run.model.training_step(x, m, run.optimizers, **_hook_options(run, starts, covariates[0] if covariates else None))
            distributed.broadcast_state(run.model)
            state.partial_train_loss += losses["loss"] / steps
            state.step = step + 1
            if progress is not None and distributed.is_main:
                progress("step", {"epoch": epoch, "step": step + 1, "steps": steps, "loss": losses["loss"]})
            if distributed.any(bool(stop)) and state.step < steps:
                return True
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # shuts DataLoader workers down when the loop ends early
    val_loss = evaluate_loss(run.model, run.validation[0], run.validation[1], config.batch_size, device, distributed,
                             starts=np.arange(len(run.validation[0])), hook_options=lambda rows: _rows_options(run, run.validation, rows))
    train_loss = distributed.sum([state.partial_train_loss])[0] / distributed.world_size
    seconds = time.perf_counter() - epoch_start
    record = {
        "epoch": epoch,
        "train_loss": train_loss,
        "validation_loss": val_loss,
        "seconds": round(seconds, 3),
        "patches_per_second": round((steps - first_step) * config.batch_size / max(seconds, 1e-9), 1),
    }
    state.history.append(record)
    if val_loss < state.best_loss:
        state.best_loss, state.best_epoch, state.waited = val_loss, epoch, 0
        state.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    else:
        state.waited += 1
    if state.waited >= config.patience:
        _advance_stage(run.model, state)
    state.epoch, state.step, state.partial_train_loss = epoch + 1, 0, 0.0
    save_state()
    if progress is not None and distributed.is_main:
        progress("epoch", {**record, "best_epoch": state.best_epoch})
    if state.waited >= config.patience:
        log.info("early stop at epoch %d (best %d)", epoch, state.best_epoch)
    return False


def _advance_stage(model: AnomalyModel, state: LoopState) -> None:
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


@torch.no_grad()
def evaluate_loss(
    model: AnomalyModel,
    images: np.ndarray,
    masks: np.ndarray,
    batch_size: int,
    device: torch.device,
    distributed: Distributed | None = None,
    starts: np.ndarray | None = None,
    hook_options: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> float:
    """Mean validation loss over a fixed set of patches, in eval mode.

    Under torchrun each process evaluates every ``world_size``-th batch and the sums are
    all-reduced, so every process gets the same number.
    """
    model.eval()
    rank, world = (distributed.rank, distributed.world_size) if distributed is not None else (0, 1)
    total, count = 0.0, 0
    for index, start in enumerate(range(0, len(images), batch_size)):
        if index % world != rank:
            continue
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        m = torch.from_numpy(masks[start : start + batch_size]).to(device)
        options = hook_options(starts[start : start + batch_size]) if hook_options is not None and starts is not None else {}
        total += model.validation_loss(x, m, **options) * len(x)
        count += len(x)
    if distributed is not None:
        total, count = distributed.sum([total, float(count)])
    return total / max(1, count)


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
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns or ["epoch"])
            writer.writeheader()
            writer.writerows(history)
    return Path(path)

