"""Memory budgets: how many patches fit in one forward pass, and what to do when they do not.

Scoring picks its batch size from a budget (``--max-memory``, or a share of the memory
that is free on the device) and an estimate of the bytes one patch costs, measured by
running the model once on a small batch with forward hooks that add up every
activation it produces (an upper bound under ``inference_mode``, where activations are
freed as soon as the next layer has used them). A batch the budget cannot hold is a
clear error before any work starts, not an out-of-memory kill; and if an allocation
fails anyway (another process took the memory), :class:`AdaptiveBatches` halves the
batch and carries on.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import sys

import numpy as np

from uadct.errors import UadctError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_AUTO_BATCH = 8192  # patches; more brings no speed on CPU or GPU and delays progress updates
AUTO_SHARE_CPU = 0.25  # share of the available RAM a scorer takes by default
AUTO_SHARE_CUDA = 0.6  # share of the free GPU memory
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class MemoryLimitError(UadctError):
    """The work asked for does not fit in the memory budget."""


def parse_memory(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GB"``, ``"2000000"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not match:
        raise UadctError(f"--max-memory {text!r}: expected a size such as 4G, 512M or 2000000 (bytes)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise UadctError(f"--max-memory {text!r}: must be positive")
    return int(value)


def format_bytes(count: float) -> str:
    """Bytes as a short human figure (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"  # pragma: no cover


def available_memory(device: "torch.device") -> int:
    """Bytes free now: GPU memory on CUDA, else the host's available RAM (cgroup limit included)."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo_available()
    limit = _cgroup_limit()
    return min(available, limit) if limit else available


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic systems
        return 4 << 30


def _cgroup_limit() -> int | None:
    """The container's memory limit minus its usage (cgroup v2 or v1), when there is one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:
            return None
        return max(0, int(limit_text) - usage)
    return None


def default_budget(device: "torch.device") -> int:
    """The budget when none is given: a share of what is free on the device."""
    share = AUTO_SHARE_CUDA if device.type == "cuda" else AUTO_SHARE_CPU
    return int(available_memory(device) * share)


class _ActivationCounter:
    """Forward hooks on every submodule of a model that add up the bytes of their outputs."""

    def __init__(self, model: "torch.nn.Module") -> None:
        self.total = 0
        self._hooks = [module.register_forward_hook(self._count) for module in model.modules() if module is not model]

    def _count(self, _module, _inputs, output) -> None:
        import torch

        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                self.total += tensor.numel() * tensor.element_size()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def inference_bytes_per_patch(model: "torch.nn.Module", patch_shape: tuple[int, ...], device: "torch.device",
                              score: "Callable[[torch.Tensor], object] | None" = None, probe: int = 4) -> int:
    """Bytes one patch costs in a forward pass: input + every module output, per patch.

    ``patch_shape`` is ``(1, *patch)`` (channels first); ``score`` runs the model on a
    batch (default ``model.score_patches``). The sum of all activations bounds the peak.
    """
    import torch

    counter = _ActivationCounter(model)
    try:
        with torch.inference_mode():
            batch = torch.zeros((probe,) + tuple(patch_shape), device=device)
            outputs = (score or model.score_patches)(batch)
    finally:
        counter.remove()
    total = counter.total
    if isinstance(outputs, dict):
        total += sum(v.numel() * v.element_size() for v in outputs.values() if isinstance(v, torch.Tensor))
    total += batch.numel() * batch.element_size()
    return max(1, int(np.ceil(total / probe)))


def training_memory(model: "torch.nn.Module", patch_shape: tuple[int, ...], device: "torch.device", learning_rate: float,
                    extra: dict | None = None, probe: int = 4) -> tuple[int, int]:
    """``(bytes per patch, fixed bytes)`` of training ``model``, measured on a copy with one step.

    A deep copy runs one ``training_step`` on a probe batch ``(probe, *patch_shape)`` with
    forward hooks adding up every activation; per patch it costs those activations
    twice (kept for backward, and their gradients). The fixed part is what the copy
    holds afterwards: weights, buffers, gradients and optimiser states. The random
    streams are restored afterwards, so the check does not change training.
    """
    import copy

    import torch

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        trial = copy.deepcopy(model).to(device).train()
        optimizers = trial.configure_optimizers(learning_rate)
        counter = _ActivationCounter(trial)
        try:
            batch = torch.rand((probe,) + tuple(patch_shape), device=device)
            trial.training_step(batch, torch.ones_like(batch), optimizers, **(extra or {}))
        finally:
            counter.remove()
    total = counter.total
    states = sum(t.numel() * t.element_size() for o in optimizers.values() for state in o.state.values()
                 for t in state.values() if isinstance(t, torch.Tensor))
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trial.parameters() if p.grad is not None)
    per_patch = max(1, int(np.ceil(2 * total / probe)) + 4 * int(np.prod(patch_shape)) * 3)  # + images, masks, copies
    return per_patch, model_bytes(trial) + gradients + states


def model_bytes(model: "torch.nn.Module") -> int:
    """Parameters and buffers of a model, in bytes."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@dataclass(frozen=True)
class BatchPlan:
    """A batch size and the figures it came from (bytes)."""

    batch_size: int
    budget: int
    fixed: int
    per_patch: int

    def describe(self) -> str:
        return (f"batch {self.batch_size} patches: {format_bytes(self.fixed)} fixed + "
                f"{format_bytes(self.per_patch)}/patch within {format_bytes(self.budget)}")


def plan_batch(requested: int | None, per_patch: int, fixed: int, budget: int, what: str = "scoring") -> BatchPlan:
    """The batch size to use: ``requested`` if it fits ``budget``, else an error; ``None``: the largest that fits.

    ``fixed`` is what the job needs whatever the batch (volumes, accumulators, weights).
    """
    room = budget - fixed
    fitting = room // per_patch if room > 0 else 0
    if fitting < 1:
        raise MemoryLimitError(
            f"{what} needs at least {format_bytes(fixed + per_patch)} ({format_bytes(fixed)} for volumes and weights "
            f"+ {format_bytes(per_patch)} per patch) but the memory budget is {format_bytes(budget)}; raise --max-memory"
        )
    if requested is None:
        return BatchPlan(int(min(fitting, MAX_AUTO_BATCH)), budget, fixed, per_patch)
    if requested > fitting:
        raise MemoryLimitError(
            f"{what}: a batch of {requested} patches needs about {format_bytes(fixed + requested * per_patch)} but the "
            f"memory budget is {format_bytes(budget)}; use --batch-size {int(fitting)} or less (or auto), or raise --max-memory"
        )
    return BatchPlan(int(requested), budget, fixed, per_patch)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the allocation failures of torch (CUDA, MPS, CPU) and numpy."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


class AdaptiveBatches:
    """Run a batch function so a batch that runs out of memory is split in halves and retried.

    ``function`` maps a batch ``(B, ...)`` array to results ``(B, ...)``; :meth:`map`
    yields ``(part, result)`` pairs that together cover the batch, so callers consume
    each part at once and never hold a whole failed batch's results. After a failure
    the smaller size is kept for every later batch (memory rarely comes back), and
    :attr:`batch_size` reports it. A single item that still fails re-raises.
    """

    def __init__(self, function: Callable[[np.ndarray], np.ndarray], batch_size: int) -> None:
        self.function = function
        self.batch_size = int(batch_size)
        self.reductions = 0

    def map(self, batch: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(part, function(part))`` for consecutive parts of ``batch``, at most :attr:`batch_size` long."""
        start = 0
        while start < len(batch):
            part = batch[start : start + self.batch_size]
            try:
                result = self.function(part)
            except Exception as exc:  # noqa: BLE001 - only memory failures are handled
                if not is_out_of_memory(exc) or len(part) <= 1:
                    raise
                del exc
                _release_cached_memory()
                self.batch_size = max(1, len(part) // 2)
                self.reductions += 1
                log.warning("out of memory with %d patches per batch; continuing with %d", len(part), self.batch_size)
                continue
            yield part, result
            start += len(part)


def _release_cached_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
