"""Several training processes (torchrun): this process's place, all-reduce, broadcast, gradient averaging."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed).

    Gradients are averaged over processes by :class:`AveragedOptimizer` before every
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


class AveragedOptimizer:
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

