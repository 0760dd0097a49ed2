"""Folders that are complete or absent: checkpoints and model folders are written beside their
place and renamed into it once every file is on disk.

Under torch.distributed every rank takes part (each may write its shards into the same staging
folder, which then must be on a file system all ranks share); the first rank makes the folder,
flushes it and renames it. A crash or kill at any moment leaves the previous folder untouched
and at worst a hidden staging folder, which the next write into the same parent removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from satrun.training import distributed


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Every rank enters it and gets the same staging folder beside ``target`` to write into;
    when all have left it without an error, the folder replaces ``target`` (by renames only,
    so an older ``target`` is never half-deleted). On an error the staging folder is removed."""
    main = distributed.current().main
    staging: Path | None = None
    if main:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(".*.tmp-*"):  # left by a crash during an earlier write
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging = distributed.from_main(staging)
    assert staging is not None
    try:
        yield staging
        distributed.barrier()  # every rank's files are written
        if main:
            _sync_tree(staging)
            old = staging.with_name(f"{staging.name}-old")
            if target.exists():
                target.rename(old)
            staging.rename(target)
            _sync(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)


def write_hf_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """safetensors + config + tokenizer into ``folder`` (not atomic by itself; every rank calls
    it). FSDP2-sharded weights are written by each rank and joined tensor by tensor, so no rank
    ever holds more than one whole tensor beyond its shards."""
    if distributed.is_sharded(model):
        distributed.save_sharded_weights(model, folder)
        if distributed.current().main:
            model.config.save_pretrained(folder)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    elif distributed.current().main:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return folder


def save_hf_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> Path:
    """A Hugging Face folder written atomically at ``target`` (every rank calls it)."""
    with staged_folder(target) as staging:
        write_hf_folder(model, tokenizer, staging)
    return target


def _sync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so a rename never exposes unwritten data."""
    for root, _, files in os.walk(folder):
        for name in files:
            _sync(Path(root) / name)
        _sync(Path(root))


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

