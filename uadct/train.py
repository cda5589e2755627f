"""The training engine: patch sampling from prepared subjects, the fit loop, early stopping.

Subjects are split into training and validation sets by subject (never by patch).
Each epoch draws ``patches_per_epoch`` random patches with at most ``max_background``
of their voxels outside the brain mask (optionally flipped and contrast-augmented,
:mod:`uadct.augment`); validation uses a fixed set of patches from the validation
subjects. The best epoch's weights are kept and written with the metadata that scoring
needs (see :mod:`uadct.checkpoint`).

Data: prepared volumes are memory-mapped from ``<subject>/cache/*.npy`` and patches are
cut in DataLoader worker processes (``workers``). Batch ``(epoch, step)`` is drawn with a
generator seeded by ``(seed, epoch, step)`` only, so the patches never depend on the
number of workers, on timing, or on where a run was resumed.

Runs are reproducible: the same seed gives bit-identical weights on the same device
(deterministic algorithms, counter-seeded batches), with or without workers. After
every epoch, and when SIGTERM/SIGINT arrive (at the end of the current step), the full
training state goes to ``<out>.resume.pt`` (atomically); the next call with the same
settings continues from it (also after SIGKILL) and gives the same weights as an
uninterrupted run. The file is removed once the final checkpoint exists.

Mixed precision: bfloat16 ``torch.autocast`` around the models' ``training_step`` hooks
(no GradScaler: bfloat16 keeps float32's exponent range). Several processes (torchrun):
see :class:`Distributed` and :class:`_AveragedOptimizer`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk
import torch

from uadct.augment import ContrastAugmenter, TissueModel, fit_tissue_gmm
from uadct.checkpoint import save_checkpoint
from uadct.errors import UadctError
from uadct.io import atomic_path, read_mask, write_json
from uadct.models import AnomalyModel, build_model
from uadct.memory import BatchPlan, available_memory, plan_batch, training_memory
from uadct.patches import PatchSpec, extract_patches, patch_centres, valid_training_positions
from uadct.preprocess.pipeline import SIDECAR, find_prepared, library_versions, load_prepared
from uadct.preprocess.resolution import training_resolution

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Training hyper-parameters (defaults follow the papers where they say).

    ``batch_size`` is the global batch: under torchrun each of N processes trains on
    ``batch_size / N`` patches per step, so results do not depend on the GPU count.
    ``augment``: any of ``"flip"`` (horizontal flips, as the GANomaly papers) and
    ``"gmm"`` (GMM/PCA contrast augmentation, :mod:`uadct.augment`).
    ``workers``: DataLoader worker processes sampling patches (``None``: automatic,
    see :func:`default_workers`). ``amp``: bfloat16 autocast (``None``: on for CUDA).
    """

    model: str = "normative"  # the winner of the real-data benchmark (docs/benchmarks.md)
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
    workers: int | None = None
    amp: bool | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    calibration_subjects: int = 4  # validation subjects scored whole for the healthy calibration (0: none)


AUGMENTATIONS = ("flip", "gmm")
CACHE_DIR = "cache"  # inside each prepared subject folder: memory-mappable arrays and tissue model
CACHE_VERSION = 1


@dataclass
class SubjectVolume:
    """A prepared subject's arrays ``(D, H, W)`` and its valid training positions ``(N, 3)``.

    ``image`` (float32) and ``mask`` (uint8 or float32, > 0 is brain) are usually
    read-only memory maps of ``<subject>/cache/*.npy``; ``cache`` is that folder, so a
    volume sent to a worker process is re-opened there instead of being copied.
    ``tissue``: the subject's tissue model when contrast augmentation is on.
    """

    subject: str
    image: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    cache: Path | None = None
    tissue: TissueModel | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.cache is not None:
            state["image"] = state["mask"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.cache is not None:
            self.image = np.load(self.cache / "image.npy", mmap_mode="r")
            self.mask = np.load(self.cache / "mask.npy", mmap_mode="r")


class PatchSampler:
    """Draws random training patches (with masks and positions) from several subjects.

    Batches are counter-based: batch ``(epoch, step)`` is drawn with a generator seeded by
    ``(seed, epoch, step)`` alone, so it is the same whichever process draws it, in
    whatever order, with any number of DataLoader workers, after a resume, and the
    ``world_size`` processes of a torchrun job draw disjoint slices of one global batch
    (each process computes the cheap random choices for the whole batch and cuts and
    augments only its own rows). :meth:`sample` draws from one sequential stream
    instead (validation and statistics sets).
    """

    def __init__(
        self,
        volumes: list[SubjectVolume],
        spec: PatchSpec,
        seed: int = 0,
        flip: bool = False,
        augmenter: ContrastAugmenter | None = None,
    ) -> None:
        usable = [v for v in volumes if len(v.positions)]
        if not usable:
            raise UadctError("no subject has a patch with enough brain in it; check the masks and the patch size")
        if augmenter is not None and any(v.tissue is None for v in usable):
            raise UadctError("contrast augmentation needs every training subject's tissue model")
        self.volumes = usable
        self.spec = spec
        self.flip = flip
        self.augmenter = augmenter
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def sample(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``count`` patches and masks ``(count, 1, *patch)`` float32 and their start positions ``(count, 3)`` int64."""
        return self._draw(count, self.rng, slice(0, count))

    def batch(self, epoch: int, step: int, count: int, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Process ``rank``'s rows of the global batch ``(epoch, step)`` of ``count`` patches (see :meth:`sample`)."""
        if count % world_size:
            raise UadctError(f"batch size {count} is not divisible by the {world_size} training processes")
        share = count // world_size
        rng = np.random.default_rng([self.seed, epoch, step])
        return self._draw(count, rng, slice(rank * share, (rank + 1) * share))

    def _draw(self, count: int, rng: np.random.Generator, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        which = rng.integers(0, len(self.volumes), count)
        picks = np.empty((count, 3), np.int64)
        for index in np.unique(which):
            members = np.flatnonzero(which == index)
            volume = self.volumes[index]
            picks[members] = volume.positions[rng.integers(0, len(volume.positions), len(members))]
        flipped = rng.random(count) < 0.5 if self.flip else np.zeros(count, bool)
        thetas: dict[int, np.ndarray] = {}  # drawn last: switching augmentations keeps the patches
        if self.augmenter is not None:
            for index in np.unique(which):
                tissue = self.volumes[index].tissue
                assert tissue is not None
                thetas[int(index)] = self.augmenter.sample_thetas(tissue, int(np.sum(which == index)), rng)
        own = np.arange(count)[rows]
        images = np.empty((len(own), 1) + _patch_shape(self.spec), np.float32)
        masks = np.empty_like(images)
        for index in np.unique(which[own]):
            members = np.flatnonzero(which == index)  # the subject's rows in the global batch
            local = np.flatnonzero(which[own] == index)  # ... and in this process's share
            volume = self.volumes[index]
            images[local, 0] = extract_patches(volume.image, picks[own[local]], self.spec)
            masks[local, 0] = extract_patches(volume.mask, picks[own[local]], self.spec)
            if self.augmenter is not None:
                assert volume.tissue is not None
                drawn = thetas[int(index)][np.searchsorted(members, own[local])]
                images[local] = self.augmenter.apply_thetas(images[local], masks[local], volume.tissue, drawn)
        positions = picks[own]
        mirror = flipped[own]
        if mirror.any():
            images[mirror] = images[mirror][..., ::-1]
            masks[mirror] = masks[mirror][..., ::-1]
            # a mirrored patch shows the mirrored place of the (atlas-centred) brain
            width = self.volumes[0].image.shape[2]
            positions[mirror, 2] = width - self.spec.shape[2] - positions[mirror, 2]
        return images, masks, positions


class _EpochBatches(torch.utils.data.Dataset):
    """Item ``i``: this process's share of batch ``(epoch, first_step + i)``, as tensors."""

    def __init__(self, sampler: PatchSampler, epoch: int, first_step: int, steps: int, batch_size: int, rank: int, world_size: int) -> None:
        self.sampler, self.epoch, self.first_step, self.steps = sampler, epoch, first_step, steps
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return self.steps - self.first_step

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, masks, positions = self.sampler.batch(self.epoch, self.first_step + index, self.batch_size, self.rank, self.world_size)
        return torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(positions)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only cut patches (numpy); leave the cores to the training step


def default_workers(device: torch.device, processes_per_node: int = 1) -> int:
    """Sampling worker processes when not given: ``min(4, cpus - 1)`` per training process
    on CUDA, 0 (sampling in the training process) on CPU/MPS, where the training step
    itself already uses every core and extra processes would only compete with it."""
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(1, processes_per_node) - 1))


def epoch_batches(
    sampler: PatchSampler, epoch: int, first_step: int, steps: int, batch_size: int, workers: int,
    rank: int = 0, world_size: int = 1, pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches of one epoch from step ``first_step``: ``(images, masks, positions)`` tensors.

    With ``workers`` > 0 they are cut in DataLoader worker processes (volumes shared
    through their memory maps). The content does not depend on ``workers``: every batch
    is keyed by ``(seed, epoch, step)`` (see :class:`PatchSampler`).
    """
    dataset = _EpochBatches(sampler, epoch, first_step, steps, batch_size, rank, world_size)
    if workers <= 0:
        for index in range(len(dataset)):
            yield dataset[index]
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, worker_init_fn=_worker_init,
        prefetch_factor=4, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
    )
    yield from loader


class TrainingInterrupted(UadctError):
    """SIGTERM/SIGINT stopped training; the resume checkpoint has been written."""


RESUME_FORMAT = "uadct-resume"
RESUME_VERSION = 2
# config fields that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = ("max_epochs", "patience", "device", "workers", "amp")


def resume_path(out_path: str | Path) -> Path:
    """Where the training state of the run writing ``out_path`` is kept."""
    return Path(str(out_path) + ".resume.pt")


def _config_fields(config: TrainConfig) -> dict[str, Any]:
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    return {k: v for k, v in fields.items() if k not in _RESUMABLE_CHANGES}


def _config_signature(config: TrainConfig) -> str:
    return json.dumps(_config_fields(config), sort_keys=True)


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


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed).

    Gradients are averaged over processes by :class:`_AveragedOptimizer` before every
    optimiser step, and rank 0's parameters and buffers are broadcast after every step
    (see :func:`train_model`); collective calls here are no-ops for one process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")  # where collective tensors live (cuda for nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes (float64)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""
        return flag if not self.enabled else self.sum([float(flag)])[0] > 0

    def broadcast_state(self, module: torch.nn.Module) -> None:
        """Overwrite every process's parameters and buffers with rank 0's."""
        if self.enabled:
            _broadcast_tensors(list(module.state_dict().values()), self.device)

    def gather(self, item: Any) -> list[Any]:
        """``item`` of every process, by rank (plain Python objects)."""
        if not self.enabled:
            return [item]
        import torch.distributed as dist

        items: list[Any] = [None] * self.world_size
        dist.all_gather_object(items, item)
        return items

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _broadcast_tensors(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Broadcast from rank 0 in one flat message per dtype (bool sent as uint8)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    for dtype, group in groups.items():
        wire = [t.detach().to(device, torch.uint8 if dtype == torch.bool else dtype) for t in group]
        flat = _flatten_dense_tensors(wire)
        dist.broadcast(flat, 0)
        for target, value in zip(group, _unflatten_dense_tensors(flat, wire)):
            target.data.copy_(value.to(target.device, dtype))


class _AveragedOptimizer:
    """An optimiser whose ``step`` first averages its parameters' gradients over processes.

    Why not ``DistributedDataParallel``: the models' ``training_step`` hooks call their
    sub-networks directly (generator, discriminator, encoder), run several backward passes
    per step over different parameter sets and freeze networks in between, which DDP's
    reducer (one forward through the wrapper per backward) does not support. Averaging
    each optimiser's gradients in one all-reduce right before its step gives exactly
    DDP's update (the mean of the per-process gradients) for any number of optimisers.
    Everything else (``zero_grad``, ``param_groups``, ``state_dict``) is the wrapped one's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, world_size: int) -> None:
        self.optimizer = optimizer
        self.world_size = world_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        if grads:
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= self.world_size
            for parameter, value in zip(parameters, _unflatten_dense_tensors(flat, grads)):
                if parameter.grad is not None:
                    parameter.grad.copy_(value)
        return self.optimizer.step(closure)


def distributed_from_environment(device: torch.device) -> tuple[Distributed, torch.device, bool]:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK, if any.

    Initialises the default process group (nccl on CUDA, gloo otherwise) unless it
    exists. Returns the context, the device this process trains on (``cuda:LOCAL_RANK``
    on CUDA) and whether the group was created here (and must be destroyed).
    """
    import torch.distributed as dist

    created = False
    if not dist.is_available():
        return Distributed(device=device), device, False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Distributed(device=device), device, False
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    wire = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return Distributed(rank, world_size, local_rank, local_world, wire), device, created


def _save_resume(
    path: Path, config: TrainConfig, model: AnomalyModel, optimizers: dict[str, torch.optim.Optimizer],
    state: _LoopState, distributed: Distributed,
) -> None:
    """Write everything needed to continue bit-identically (tensors and plain data only).

    Every process takes part (their random states are gathered); rank 0 writes.
    """
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng_states = distributed.gather((torch.get_rng_state(), cuda_rng))
    if not distributed.is_main:
        return
    payload = {
        "format": RESUME_FORMAT,
        "format_version": RESUME_VERSION,
        "config": _config_signature(config),
        "world_size": distributed.world_size,
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
        "torch_rng": [torch_state for torch_state, _ in rng_states],
        "cuda_rng": [cuda_state for _, cuda_state in rng_states],
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _read_resume(path: Path, config: TrainConfig) -> dict[str, Any]:
    """The payload of a resume file written with the same settings; clear errors otherwise."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unreadable file is the file's problem, not a bug
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UadctError(f"{path}: not a readable uadct resume file ({first}); delete it or pass --no-resume to start afresh") from None
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT or payload.get("format_version") != RESUME_VERSION:
        raise UadctError(f"{path}: not a uadct resume file (format {RESUME_FORMAT!r} version {RESUME_VERSION} expected); "
                         "pass --no-resume to start afresh")
    if payload["config"] != _config_signature(config):
        saved, now = json.loads(payload["config"]), _config_fields(config)
        changed = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
        raise UadctError(f"{path}: an interrupted run with other training settings ({changed}); run it with its own "
                         f"settings to finish it, or pass --no-resume (--force) to start afresh; only "
                         f"{', '.join(_RESUMABLE_CHANGES)} may change on resume")
    return payload


def _load_resume(
    payload: dict[str, Any], path: Path, model: AnomalyModel, optimizers: dict[str, torch.optim.Optimizer],
    device: torch.device, distributed: Distributed,
) -> _LoopState:
    """Restore model, optimisers, random streams and loop position from a resume payload."""
    model.load_state_dict(payload["model"])
    if set(payload["optimizers"]) != set(optimizers):
        raise UadctError(f"{path}: holds optimisers {sorted(payload['optimizers'])}, the model has {sorted(optimizers)}")
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(payload["optimizers"][name])
    if int(payload["world_size"]) != distributed.world_size:
        log.warning("%s: written by %d training processes, resumed with %d: training continues but is not "
                    "bit-identical to an uninterrupted run", path, int(payload["world_size"]), distributed.world_size)
    rank = min(distributed.rank, len(payload["torch_rng"]) - 1)
    torch.set_rng_state(payload["torch_rng"][rank])
    if payload["cuda_rng"][rank] and device.type == "cuda":
        torch.cuda.set_rng_state_all(payload["cuda_rng"][rank])
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
    tissue_models: bool = False,
) -> tuple[list[SubjectVolume], dict[str, Any]]:
    """Read prepared subjects (memory-mapped from their array cache); all must share
    preprocessing parameters and atlas.

    With ``exclude_labels``, a subject that has ``<subject>.nii.gz`` there (a lesion mask
    on its own scan's grid) contributes only patches that do not overlap the lesion.
    ``tissue_models``: also fit (or read from the cache) each subject's tissue model for
    contrast augmentation.
    """
    volumes: list[SubjectVolume] = []
    reference: dict[str, Any] | None = None
    for folder in subject_dirs:
        folder = Path(folder)
        sidecar = _read_sidecar(folder)
        signature = {"config": sidecar.get("config"), "atlas": sidecar.get("atlas")}
        if reference is None:
            reference = signature
        elif signature != reference:
            raise UadctError(f"{folder}: preprocessed with other parameters or atlas than {subject_dirs[0]}; preprocess all subjects alike")
        image, mask, cache, tissue = cached_subject_arrays(folder, tissue_models)
        lesion = None
        if exclude_labels:
            lesion = _lesion_on_atlas_grid(load_prepared(folder), exclude_labels)
        positions = valid_training_positions(np.asarray(mask), spec, max_background, exclude=lesion)
        volumes.append(SubjectVolume(sidecar.get("subject", folder.name), image, mask, positions, cache, tissue))
    assert reference is not None
    return volumes, reference


def _read_sidecar(folder: Path) -> dict[str, Any]:
    path = folder / SIDECAR
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UadctError(f"{folder}: not a prepared subject folder (no {SIDECAR}); run `uadct preprocess` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UadctError(f"{path}: unreadable or corrupt JSON ({type(exc).__name__})") from None


def _source_stamp(folder: Path) -> dict[str, list[int]]:
    """Size and modification time (ns) of the prepared NIfTI files the cache is made from."""
    stamp = {}
    for name in ("image.nii.gz", "mask.nii.gz"):
        info = (folder / name).stat()
        stamp[name] = [info.st_size, info.st_mtime_ns]
    return stamp


def cached_subject_arrays(folder: str | Path, tissue_model: bool = False) -> tuple[np.ndarray, np.ndarray, Path | None, TissueModel | None]:
    """A prepared subject's image ``(D, H, W)`` float32 and mask (uint8) as read-only memory maps.

    The arrays are cached as ``<subject>/cache/image.npy`` and ``mask.npy``, written
    atomically and described by ``cache/cache.json`` (which also keeps the tissue model
    once fitted), written last and names the size and modification time
    of the NIfTI files they come from: a cache whose sources changed, or whose arrays do
    not have the recorded shape, is rebuilt. When the folder is read-only the arrays are
    kept in memory instead (returned cache folder ``None``).
    """
    folder = Path(folder)
    cache = folder / CACHE_DIR
    stamp = _source_stamp(folder)
    meta_path = cache / "cache.json"
    meta: dict[str, Any] = {}
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    image = mask = None
    if meta.get("version") == CACHE_VERSION and meta.get("sources") == stamp:
        try:
            image = np.load(cache / "image.npy", mmap_mode="r")
            mask = np.load(cache / "mask.npy", mmap_mode="r")
            if list(image.shape) != meta["shape"] or image.shape != mask.shape or image.dtype != np.float32:
                image = mask = None
        except (OSError, ValueError, KeyError):
            image = mask = None
    writable = True
    if image is None or mask is None:
        prepared = load_prepared(folder)
        array = sitk.GetArrayFromImage(prepared.image).astype(np.float32)
        brain = (sitk.GetArrayFromImage(prepared.mask) > 0).astype(np.uint8)
        meta = {"version": CACHE_VERSION, "sources": stamp, "shape": list(array.shape)}
        try:
            cache.mkdir(exist_ok=True)
            for name, data in (("image.npy", array), ("mask.npy", brain)):
                with atomic_path(cache / name) as tmp:
                    np.save(tmp, data)
            write_json(meta, meta_path)
            image = np.load(cache / "image.npy", mmap_mode="r")
            mask = np.load(cache / "mask.npy", mmap_mode="r")
        except OSError as exc:
            log.warning("%s: cannot write the array cache (%s); keeping this subject in memory", cache, exc.strerror or exc)
            image, mask, writable = array, brain, False
    tissue = None
    if tissue_model:
        if "tissue" in meta:
            tissue = TissueModel.from_dict(meta["tissue"])
        else:
            tissue = fit_tissue_gmm(image, mask)
            meta["tissue"] = tissue.to_dict()
            if writable:
                try:
                    write_json(meta, meta_path)
                except OSError:
                    pass
    return image, mask, (cache if writable else None), tissue


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


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast (no loss scaling needed: bfloat16 has float32's exponent range)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _use_amp(config: TrainConfig, device: torch.device) -> bool:
    """Whether to train under bfloat16 autocast: ``config.amp``, or by default on CUDA GPUs that have bfloat16."""
    bfloat16_gpu = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if config.amp is None:
        return bfloat16_gpu
    if config.amp and device.type == "cuda" and not bfloat16_gpu:
        log.warning("this GPU has no bfloat16 (before Ampere): training in float32")
        return False
    if config.amp and device.type not in ("cuda", "cpu"):
        log.warning("mixed precision is not supported on %s; training in float32", device)
        return False
    if config.amp and device.type == "cpu":
        log.warning("mixed precision on CPU: bfloat16 autocast as on CUDA, but usually slower than float32 here")
    return bool(config.amp)


@dataclass
class _Run:
    """What the fit loop works with (fixed for the run)."""

    model: AnomalyModel
    optimizers: dict[str, Any]  # as the model's hooks see them (gradient-averaging under torchrun)
    sampler: PatchSampler
    validation: tuple[np.ndarray, np.ndarray, np.ndarray]
    config: TrainConfig
    steps: int
    device: torch.device
    workers: int
    amp: bool
    distributed: Distributed
    volume_shape: tuple[int, int, int]


def _hook_options(run: _Run, positions: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """``positions=`` (normalised patch centres) for models that are conditioned on them."""
    if not getattr(run.model, "uses_positions", False):
        return {}
    centres = patch_centres(np.asarray(positions), run.sampler.spec, run.volume_shape)
    return {"positions": torch.from_numpy(centres).to(run.device)}


TRAINING_SHARE_OF_FREE_MEMORY = 0.9


def check_training_memory(model: AnomalyModel, spec: PatchSpec, config: TrainConfig, device: torch.device,
                          processes: int = 1, max_memory: int | None = None) -> BatchPlan:
    """Refuse a batch that cannot fit before training starts (instead of an out-of-memory kill).

    Each process trains on ``batch_size / processes`` patches; its need is measured by
    :func:`uadct.memory.training_memory` (activations per patch, weights, gradients and
    optimiser states), plus the validation patches it keeps.
    """
    shape = (1,) + (spec.shape[1:] if spec.dims == 2 else spec.shape)
    extra = {"positions": torch.zeros((4, 3), device=device)} if getattr(model, "uses_positions", False) else {}
    per_patch, fixed = training_memory(model, shape, device, config.learning_rate, extra)
    fixed += 3 * 4 * config.validation_patches * int(np.prod(shape))  # validation images, masks, positions
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
    augmenter = ContrastAugmenter(normalization=(signature["config"] or {}).get("normalization", "percentile")).fit([v.tissue.theta for v in train_volumes if v.tissue is not None]) if gmm else None
    model = build_model(config.model, {"patch_size": config.patch_size, "dims": config.dims, **config.model_options}).to(device)
    check_training_memory(model, spec, config, device, distributed.world_size, max_memory)
    optimizers = model.configure_optimizers(config.learning_rate)
    sampler = PatchSampler(train_volumes, spec, seed=config.seed, flip="flip" in config.augment, augmenter=augmenter)
    validation = PatchSampler(val_volumes, spec, seed=config.seed + 1).sample(config.validation_patches)
    if distributed.rank:  # own dropout/noise streams per process; rank 0 keeps the single-process stream
        torch.manual_seed(config.seed + 1_000_003 * distributed.rank)
    workers = config.workers if config.workers is not None else default_workers(device, distributed.local_world_size)
    amp = _use_amp(config, device)
    hooks_optimizers: dict[str, Any] = (
        {name: _AveragedOptimizer(o, distributed.world_size) for name, o in optimizers.items()} if distributed.enabled else optimizers
    )
    run = _Run(model, hooks_optimizers, sampler, validation, config, max(1, config.patches_per_epoch // config.batch_size),
               device, workers, amp, distributed, tuple(train_volumes[0].image.shape))

    state = _LoopState()
    resume_file = resume_path(out_path)
    if distributed.is_main:  # temporary files of a killed run's atomic writes (never a finished file)
        for stale in out_path.parent.glob(f".{out_path.name}.*.tmp*"):
            stale.unlink(missing_ok=True)
    if resume is not False and resume_file.is_file():
        state = _load_resume(_read_resume(resume_file, config), resume_file, model, optimizers, device, distributed)
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
        _save_resume(resume_file, config, model, optimizers, state, distributed)

    with _stop_on_signals() as stop:
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
        statistics_images, statistics_masks, statistics_positions = sampler.sample(config.statistics_patches)
        with torch.no_grad():
            model.fit_statistics(torch.from_numpy(statistics_images).to(device), torch.from_numpy(statistics_masks).to(device),
                                 **_hook_options(run, statistics_positions))
        from uadct.scoring import MOOD_SCALE_KEY, estimate_score_scale

        if hasattr(model, "fit_volumes"):  # voxel-wise models (normative) fit and calibrate on whole volumes
            from uadct.training_volumes import fit_volume_model

            score_scale = fit_volume_model(model, train_volumes, val_volumes, train_dirs, val_dirs, config.exclude_labels)
        else:
            score_scale = estimate_score_scale(model, validation[0], validation[1], config.batch_size, device,
                                               hook_options=lambda rows: _hook_options(run, validation[2][rows]))
        calibration = []
        if config.calibration_subjects > 0:  # maps of whole held-out healthy subjects -> calibrated units, FPR thresholds
            from uadct.calibrate_maps import calibrate_trained_model

            calibration = [calibrate_trained_model(model, {"size": spec.size, "dims": spec.dims}, val_dirs[: config.calibration_subjects],
                                                   config.exclude_labels, str(device)).to_dict()]
        seconds = time.perf_counter() - started
        metadata = {
            "patch": {"size": spec.size, "dims": spec.dims},
            "preprocess": signature["config"],
            "atlas": signature["atlas"],
            "resolution": training_resolution([_read_sidecar(Path(f)) for f in [*train_dirs, *val_dirs]]),
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
            MOOD_SCALE_KEY: score_scale,
            "calibration": calibration,
        }
        save_checkpoint(out_path, model.cpu(), metadata)
        write_json(history, Path(str(out_path) + ".history.json"))
        write_history_csv(history, Path(str(out_path) + ".history.csv"))
        resume_file.unlink(missing_ok=True)
    distributed.barrier()
    return TrainResult(out_path, history, best_epoch, best_loss, train_names, val_names, seconds)


def _run_epoch(
    run: _Run,
    state: _LoopState,
    progress: Callable[[str, dict[str, Any]], None] | None,
    stop: _StopRequest,
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
        for step, (images, masks, positions) in enumerate(batches, start=first_step):
            x = images.to(device, non_blocking=True)
            m = masks.to(device, non_blocking=True)
            with _autocast(device, run.amp):
                losses = run.model.training_step(x, m, run.optimizers, **_hook_options(run, positions))
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
                             positions=run.validation[2], hook_options=lambda p: _hook_options(run, p))
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


@torch.no_grad()
def evaluate_loss(
    model: AnomalyModel,
    images: np.ndarray,
    masks: np.ndarray,
    batch_size: int,
    device: torch.device,
    distributed: Distributed | None = None,
    positions: np.ndarray | None = None,
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
        options = hook_options(positions[start : start + batch_size]) if hook_options is not None and positions is not None else {}
        total += model.validation_loss(x, m, **options) * len(x)
        count += len(x)
    if distributed is not None:
        total, count = distributed.sum([total, float(count)])
    return total / max(1, count)
