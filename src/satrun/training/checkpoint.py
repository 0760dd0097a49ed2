"""Checkpoints that are complete or absent: ``checkpoints/step_N/`` = model + training state.

One process (or DDP, whose ranks hold the same state) writes a Hugging Face model folder and
``training_state.pt`` with the optimizer state in it. Under FSDP2 every rank writes its own
shards of the weights and optimizer state into ``shards/`` (torch.distributed.checkpoint), in
parallel, and the first rank adds ``training_state.pt`` with the rest. Either way the folder is
written beside its place and renamed into it when complete (:func:`staged_folder`). Only
folders named ``step_N`` holding ``training_state.pt`` count as checkpoints.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from satrun.errors import UsageError
from satrun.training import distributed
from satrun.training.saving import damage, staged_folder

STATE_FILE = "training_state.pt"
SHARDS = "shards"
_STEP = re.compile(r"^step_(\d+)$")


def checkpoints_in(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    write_model: Optional[Callable[[Path], Any]], keep: int,
) -> Path:
    """Write ``folder/step_{step}`` atomically (every rank calls it), then keep only the newest
    ``keep`` checkpoints. ``state``: the loop's own state (the first rank's is written);
    ``write_model(folder)`` writes the model folder where the weights are not sharded."""
    target = folder / f"step_{step}"
    main = distributed.current().main
    with staged_folder(target, manifest=True) as staging:
        if distributed.is_sharded(model):
            distributed.save_sharded(model, optimizer, staging / SHARDS)
            state = {**state, "ranks": distributed.current().size}
        else:
            state = {**state, "optimizer": optimizer.state_dict()}
            if main and write_model is not None:
                write_model(staging)
        if main:
            torch.save(state, staging / STATE_FILE)
    if main:
        for old in checkpoints_in(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return target


def resume_point(resume: Optional[str], run_dir: Path, say: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint to continue from: ``auto`` takes the newest intact one in this run's
    folder (none: start afresh), saying which damaged ones it passed over; a path may be a
    checkpoint, a run folder or its checkpoints/ folder (the newest is taken). A named
    checkpoint that is damaged is refused."""
    if resume is None:
        return None
    if resume == "auto":
        found = checkpoints_in(run_dir / "checkpoints")
        for folder in reversed(found):
            wrong = damage(folder)
            if wrong is None:
                return folder
            say(f"resume=auto: skipping {folder}: {wrong}")
        if found:
            raise UsageError(f"resume=auto: no intact checkpoint in {run_dir / 'checkpoints'} (all {len(found)} damaged)")
        say(f"resume=auto: no checkpoint in {run_dir}; starting from step 0")
        return None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        found = checkpoints_in(path / "checkpoints") or checkpoints_in(path)
        if not found:
            raise UsageError(f"resume={resume}: no checkpoint there (expected a checkpoints/step_N folder or a run folder holding one)")
        path = found[-1]
    wrong = damage(path)
    if wrong is not None:
        raise UsageError(f"resume={resume}: {path} is damaged: {wrong}")
    return path


def load_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's training state; ``sharded`` tells whether its weights are FSDP2 shards."""
    try:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or overwritten: pickle, zip and torch raise many kinds
        raise UsageError(f"{checkpoint / STATE_FILE} cannot be read ({type(exc).__name__}); resume from another checkpoint") from exc
    state["sharded"] = (checkpoint / SHARDS).is_dir()
    state["folder"] = str(checkpoint)
    return state


def check_resumable(state: dict[str, Any], ranks: int, sharded: bool) -> None:
    """A sharded checkpoint continues only on as many FSDP2 ranks as wrote it."""
    if state["sharded"] and (not sharded or state.get("ranks") != ranks):
        raise UsageError(
            f"resume={state['folder']}: written by {state.get('ranks')} FSDP2 ranks; resume it with "
            f"{state.get('ranks')} ranks and trainer.strategy=fsdp (this run: {ranks} rank(s)"
            f"{', fsdp' if sharded else ''})"
        )


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Weights (sharded checkpoints; otherwise the caller loaded them) and optimizer state."""
    if state["sharded"]:
        distributed.load_sharded(model, optimizer, Path(state["folder"]) / SHARDS)
    else:
        distributed.load_optimizer_state(model, optimizer, state["optimizer"])


def rng_state() -> dict[str, Any]:
    """Every random number generator a training step may draw from."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
