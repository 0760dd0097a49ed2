"""Checkpoints that are complete or absent: ``checkpoints/step_N/`` = model folder + training state.

A checkpoint is written into a hidden staging folder beside its final place and renamed into
place only when every file is on disk, so a crash (or kill -9) at any moment leaves the previous
checkpoints untouched and at worst a stale staging folder, which the next save removes. Only
folders named ``step_N`` holding ``training_state.pt`` count as checkpoints.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

STATE_FILE = "training_state.pt"
_STEP = re.compile(r"^step_(\d+)$")


def checkpoints_in(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    folder: Path, step: int, write_model: Optional[Callable[[Path], Any]], state: dict[str, Any], keep: int
) -> Path:
    """Write ``folder/step_{step}`` atomically, then keep only the newest ``keep`` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step_*.tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    target = folder / f"step_{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=folder))
    try:
        if write_model is not None:
            write_model(staging)
        torch.save(state, staging / STATE_FILE)
        _sync_folder(staging)
        if target.exists():  # out of the way by a rename: a checkpoint is never half-deleted
            target.rename(staging.with_name(f"{staging.name}-old"))
        staging.rename(target)
        _sync_folder(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(f"{staging.name}-old"), ignore_errors=True)
    for old in checkpoints_in(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)


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


def _sync_folder(folder: Path) -> None:
    """Flush the folder's files and entries to disk, so a rename never exposes unwritten data."""
    for path in [*folder.iterdir(), folder]:
        if path.is_file() or path == folder:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
