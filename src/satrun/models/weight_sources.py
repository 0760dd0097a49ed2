"""Where a training run's parameters get their values once the trainer has wrapped the model:
a checkpoint, each FSDP2 rank's shards of the pre-trained weights, the first rank's random
model, and with LoRA the base plus the seeded initial adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from satrun.config import TrainConfig
from satrun.errors import UsageError
from satrun.models import load_weights, weights_folder
from satrun.models.adapters import ADAPTER_FOLDER, initial_adapter_state, is_adapted, load_adapters
from satrun.training import distributed


def weight_source(cfg: TrainConfig, model: PreTrainedModel, resume: dict[str, Any] | None,
                   sharded: bool) -> Callable[[torch.nn.Module], None] | None:
    """How the parameters get their values once the trainer has wrapped the model (None: they
    have them). A resumed run reads its checkpoint (sharded checkpoints: the trainer restores
    them with the optimizer); an FSDP2 start has each rank read its own shards of the
    pre-trained weights, or, for a random model, take them from the first rank, which built it."""
    if is_adapted(model):
        return _adapted_weight_source(cfg, model, resume, sharded)
    if resume is not None:
        return None if resume["sharded"] else (lambda m: load_weights(m, Path(resume["folder"])))
    return _start_weights(cfg, model) if sharded else None


def _start_weights(cfg: TrainConfig, model: torch.nn.Module) -> Callable[[torch.nn.Module], None]:
    """An FSDP2 start: each rank reads its shards of the pre-trained weights, or, for a random
    model, takes them from the first rank, which built it."""
    folder = weights_folder(cfg.model)
    if folder is not None:
        return lambda m: load_weights(m, folder)
    full = model.state_dict() if distributed.current().main else None  # the first rank's whole model
    return lambda m: distributed.broadcast_weights(m, full)


def _adapted_weight_source(cfg: TrainConfig, model: torch.nn.Module, resume: dict[str, Any] | None,
                           sharded: bool) -> Callable[[torch.nn.Module], None] | None:
    """With adapters the base always comes from where the model does (a checkpoint holds the
    adapters alone). One process: the base is loaded and the adapters initialised already; a
    resume reads the checkpoint's adapters. FSDP2: the base as at any start, then the seeded
    initial adapters, or on resume the trainer restores them from the shards with the
    optimizer state."""
    if not sharded:
        return None if resume is None else (lambda m: load_adapters(m, Path(resume["folder"]) / ADAPTER_FOLDER))
    if resume is not None and not resume["sharded"]:
        raise UsageError(f"resume={resume['folder']}: a checkpoint of adapters written by one process does not resume "
                         "under trainer.strategy=fsdp; resume it as it was written")
    base = _start_weights(cfg, model)
    initial = initial_adapter_state(model, cfg.trainer.seed) if resume is None else {}

    def fill(m: torch.nn.Module) -> None:
        base(m)
        distributed.fill_whole(m, initial)
    return fill
