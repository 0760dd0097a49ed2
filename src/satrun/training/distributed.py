"""Data parallelism over torch.distributed: the process group, wrapping, and rank-0 duties.

satrun does not launch ranks of its own: torchrun (or torch.distributed's launcher API, used by
``launcher=torchrun``) starts them and sets the usual environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT). One process group serves CPU tensors with gloo and CUDA tensors
with NCCL. Every rank trains on its own slice of each global batch; gradients are averaged by
DDP or reduce-scattered by FSDP2, and the loss is scaled so that the result is the gradient of
the global batch's token-mean loss, as one process training on the whole global batch gets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from satrun.errors import UsageError

STRATEGIES = ("auto", "single", "ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_from_env() -> World:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return current()


def current() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def device_of(world: World, device: torch.device) -> torch.device:
    """Each rank on its own GPU (by LOCAL_RANK); CPU ranks share the CPU."""
    if device.type == "cuda" and world.size > 1:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def wrap(module: torch.nn.Module, blocks: list[torch.nn.Module], strategy: str, world: World,
         device: torch.device) -> torch.nn.Module:
    """``module`` as the strategy trains it: as is (one process), DDP, or FSDP2 (each of
    ``blocks`` sharded on its own, then the rest)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"trainer.strategy={strategy!r} is not one of: {', '.join(STRATEGIES)}")
    if world.size == 1 or strategy == "single":
        return module
    if strategy in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(module)
    return module


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP2, the unsharded weights on CPU (a collective: every rank calls it); else None."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state as one process would hold it (under FSDP2 gathered: a collective)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of :func:`optimizer_state`: under FSDP2 each rank keeps its shard of it."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def total(value: float, device: torch.device) -> float:
    """Sum of ``value`` over all ranks."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on some rank (e.g. a signal that reached one rank)."""
    return total(1.0 if flag else 0.0, device) > 0


def from_main(value: T) -> T:
    """The first rank's ``value`` on every rank (e.g. a path only it has looked up)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
