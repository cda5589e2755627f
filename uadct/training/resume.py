"""Resuming: the full training state in ``<out>.resume.pt``, and stopping cleanly on SIGTERM/SIGINT.

After every epoch, and when SIGTERM/SIGINT arrive (at the end of the current step), the
full training state (weights, optimisers, random streams, loop position, early-stopping
state) goes to ``<out>.resume.pt`` (atomically; tensors and plain data only, read with
``weights_only=True``); the next call with the same settings continues from it (also
after SIGKILL) and gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from uadct.errors import UadctError
from uadct.io import atomic_path
from uadct.models import AnomalyModel
from uadct.training.config import TrainConfig
from uadct.training.distributed import Distributed

log = logging.getLogger(__name__)


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
class LoopState:
    """Where the fit loop stands: the next (epoch, step) to run and what early stopping knows."""

    epoch: int = 0
    step: int = 0
    partial_train_loss: float = 0.0
    best_loss: float = float("inf")
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    waited: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def save_resume(
    path: Path, config: TrainConfig, model: AnomalyModel, optimizers: dict[str, torch.optim.Optimizer],
    state: LoopState, distributed: Distributed,
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


def read_resume(path: Path, config: TrainConfig) -> dict[str, Any]:
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


def load_resume(
    payload: dict[str, Any], path: Path, model: AnomalyModel, optimizers: dict[str, torch.optim.Optimizer],
    device: torch.device, distributed: Distributed,
) -> LoopState:
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
    return LoopState(
        epoch=int(payload["epoch"]), step=int(payload["step"]), partial_train_loss=float(payload["partial_train_loss"]),
        best_loss=float(payload["best_loss"]), best_epoch=int(payload["best_epoch"]),
        best_state={k: v.to(device) for k, v in best.items()} if best else None,
        waited=int(payload["waited"]), history=json.loads(payload["history"]),
    )


class StopRequest:
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
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGTERM/SIGINT (main thread only) and restore the original handlers afterwards."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

