"""Data parallelism over torch.distributed: the process group, wrapping, and rank-0 duties.

satrun does not launch ranks of its own: torchrun (or torch.distributed's launcher API, used by
``launcher=torchrun``) starts them and sets the usual environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT). One process group serves CPU tensors with gloo and CUDA tensors
with NCCL. Every rank trains on its own slice of each global batch; gradients are averaged by
DDP or reduce-scattered by FSDP2, and the loss is scaled so that the result is the gradient of
the global batch's token-mean loss, as one process training on the whole global batch gets.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

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
         device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``module`` as the strategy trains it: as is (one process), DDP, or FSDP2 (each of
    ``blocks`` sharded on its own, then the rest). Under FSDP2 with a 16-bit ``dtype`` the
    gathered parameters are cast to it for compute (FSDP2's MixedPrecisionPolicy) while the
    sharded fp32 parameters stay the optimizer's master copy, and gradients are reduced in fp32."""
    if strategy not in STRATEGIES:
        raise UsageError(f"trainer.strategy={strategy!r} is not one of: {', '.join(STRATEGIES)}")
    if world.size == 1 or strategy == "single":
        return module
    if strategy in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        # Gradients as views of DDP's communication buckets: without it DDP keeps a second,
        # bucketed copy of every gradient (4 bytes per parameter: 25 GB at 7B).
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """A backward inside reduces gradients across ranks only when ``enabled``: under gradient
    accumulation every micro-batch but the last keeps its gradients local (DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync``), so a step communicates once, not once per
    micro-batch. The last micro-batch's reduction then carries the accumulated sum."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if enabled or not isinstance(module, (DistributedDataParallel, FSDPModule)):
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)


def sharded_start(strategy: str, world: World) -> bool:
    """Whether the model is built without weights (meta device) and filled shard by shard
    after wrapping: FSDP2 over several ranks, so that no rank ever holds the whole model."""
    return world.size > 1 and strategy == "fsdp"


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def materialize(model: torch.nn.Module, device: torch.device, fill: Optional[Callable[[torch.nn.Module], None]]) -> None:
    """After wrapping: parameters still on the meta device get real storage on ``device`` (under
    FSDP2 only this rank's shard), then ``fill(model)`` gives them their values."""
    if any(p.is_meta for p in model.parameters()):
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # computed, not loaded
        model.to_empty(device=device)
        if not is_sharded(model) and hasattr(model, "tie_weights"):
            model.tie_weights()  # to_empty gives every module a new parameter (FSDP2 keeps its ties)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    if fill is not None:
        fill(model)


def broadcast_weights(model: torch.nn.Module, full_state: Optional[dict[str, torch.Tensor]]) -> None:
    """Fill each rank's shards from the first rank's whole weights (``full_state``, None
    elsewhere): the start-up for a model that exists only in memory (random initialisation)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full_state if full_state is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def reshard(module: torch.nn.Module) -> None:
    """Put every FSDP2 module in ``module`` back to its sharded parameters: after a forward
    without backward (evaluation) the root keeps its gathered (under bf16: cast) parameters,
    which a checkpoint or the final weights would otherwise take for the model's own."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def _trained_only(strict: bool = True):  # type: ignore[no-untyped-def]
    """State-dict options that leave out frozen parameters (a LoRA run's base: not trained, and
    loaded from its own folder again on resume)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _without_frozen(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without frozen parameters under any of their names (``ignore_frozen_params``
    drops a tied one under its first name only: a frozen tied LM head would stay)."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {name: value for name, value in state.items() if name not in frozen}


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the trained weights (frozen ones are left out) and of the
    optimizer state into ``folder`` (one torch.distributed.checkpoint, in parallel; the folder
    must be the same on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_trained_only())
    dcp.save({"model": _without_frozen(model, model_state), "optimizer": optim_state}, checkpoint_id=str(folder))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The inverse of :func:`save_sharded`: each rank reads its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_trained_only())
    state = {"model": _without_frozen(model, model_state), "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    # not strict: the frozen parameters (all of them, tied ones too) are the ones left out
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_trained_only(strict=False))


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters (e.g. LoRA adapters) as whole CPU tensors under ``model``'s
    state-dict names: a collective under FSDP2 (every rank calls it; the first rank gets them,
    the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def fill_whole(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Some of ``model``'s parameters from whole tensors every rank holds (``state``; the
    others keep their values): under FSDP2 each rank keeps its rows."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def save_sharded_weights(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Weights (FSDP2 shards, by their Hugging Face names; a tied weight once) as a plain Hugging
    Face safetensors folder: every rank writes its shards, then the first rank joins them into
    whole tensors, one tensor in memory at a time (torch.distributed.checkpoint's Hugging Face
    writer)."""
    import shutil

    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True,
                                                                 enable_consolidation=True))
    barrier()
    if current().main:
        shutil.rmtree(folder / "sharded", ignore_errors=True)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """An optimizer state saved by one process (or DDP's first rank); under FSDP2 each rank keeps its shard."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def total(value: float, device: torch.device) -> float:
    """Sum of ``value`` over all ranks."""
    return totals([value], device)[0]


def totals(values: Sequence[float], device: torch.device) -> list[float]:
    """Each of ``values`` (host numbers) summed over all ranks, in one collective. It goes
    through gloo on host memory when the group has it (``init_from_env`` gives CUDA runs both
    gloo and NCCL): an NCCL reduction would be queued behind the device's work and reading it
    back would wait for all of that."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    if "gloo" in str(dist.get_backend()):
        device = torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


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
