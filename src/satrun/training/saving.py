"""Folders that are complete or absent: checkpoints and model folders are written beside their
place and renamed into it once every file is on disk.

Under torch.distributed every rank takes part (each may write its shards into the same staging
folder, which then must be on a file system all ranks share); the first rank makes the folder,
flushes it and renames it. A crash or kill at any moment leaves the previous folder untouched
and at worst a hidden staging folder, which the next write into the same parent removes (in a
shared cache such folders are left: another process may be writing them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from satrun.errors import DiskFull
from satrun.training import distributed


MANIFEST = "manifest.json"


@contextlib.contextmanager
def staged_folder(target: Path, manifest: bool = False, shared: bool = False) -> Iterator[Path]:
    """Every rank enters it and gets the same staging folder beside ``target`` to write into;
    when all have left it without an error, the folder replaces ``target`` (by renames only,
    so an older ``target`` is never half-deleted). On an error the staging folder is removed.
    ``manifest``: the first rank adds ``manifest.json`` (every file's size) last, so that a
    reader can tell a complete folder from a damaged one (:func:`damage`).
    ``shared``: one process writes (no collective: the caller picks it), and others may write
    into the same parent (a cache): their staging folders are left alone, and a ``target`` one
    of them finished meanwhile is kept rather than replaced."""
    main = shared or distributed.current().main
    collective = not shared
    staging: Path | None = None
    if main:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not shared:
            remove_stale(target.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    if collective:
        staging = distributed.from_main(staging)
    assert staging is not None
    try:
        try:
            yield staging
            if collective:
                distributed.barrier()  # every rank's files are written
            if main:
                if manifest:
                    sizes = {str(f.relative_to(staging)): f.stat().st_size for f in sorted(staging.rglob("*")) if f.is_file()}
                    (staging / MANIFEST).write_text(json.dumps({"files": sizes}, indent=1) + "\n", encoding="utf-8")
                _follow_umask(staging)
                _sync_tree(staging)
        except Exception as exc:
            if main and _out_of_space(staging, exc):
                raise DiskFull(f"no space left on the device of {target.parent} writing {target.name} "
                               f"(wrote {_size(staging)} bytes{_needed(target)}, {shutil.disk_usage(staging).free} free)") from exc
            raise
        if shared:
            try:
                staging.rename(target)
            except OSError:
                if not target.exists():
                    raise  # else another process finished first: its folder is kept
        elif main:
            old = staging.with_name(f"{staging.name}-old")
            if target.exists():
                target.rename(old)
            staging.rename(target)
            _sync(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        if collective:
            distributed.barrier()
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale(folder: Path) -> None:
    """Remove the staging folders a crash or kill during an earlier write left in ``folder``."""
    for stale in folder.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(folder: Path) -> None:
    """Modes as a plain write gives them: mkdtemp makes ``folder`` private (0700), and some
    writers (transformers' safetensors save) create their files 0600 through a temporary file,
    which others could then not read."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _out_of_space(folder: Path, exc: BaseException) -> bool:
    """Whether a failed write ran out of disk: ENOSPC or EDQUOT (or a library's error saying
    so), or, as torch's zip writer says only "unexpected pos", next to nothing left free."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):  # e.g. safetensors' own error
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _needed(target: Path) -> str:
    """What the last folder of this kind took, as the size to expect (checkpoints: the previous one)."""
    siblings = [p for p in target.parent.glob("step_*") if p.is_dir()] if target.name.startswith("step_") else []
    previous = target if target.is_dir() else max(siblings, key=lambda p: p.stat().st_mtime, default=None)
    return f" of about {_size(previous)} needed" if previous is not None else ""


def damage(folder: Path) -> str | None:
    """What is wrong with a folder written with a manifest: a file missing or of another size
    than written (truncated, emptied); None when all is as written or it has no manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, OSError) as exc:
        return f"{MANIFEST} unreadable ({type(exc).__name__})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes of the {size} written"
    return None


def write_hf_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path,
                    state: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """safetensors + config + tokenizer into ``folder`` (not atomic by itself; every rank calls
    it). FSDP2-sharded weights are written by each rank and joined tensor by tensor, so no rank
    ever holds more than one whole tensor beyond its shards; ``state`` (sharded models only)
    gives the weights to write instead of the model's own parameters."""
    if distributed.is_sharded(model):
        distributed.save_sharded_weights(state if state is not None else {n: p.detach() for n, p in model.named_parameters()},
                                         folder)
        if distributed.current().main:
            model.config.save_pretrained(folder)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    elif distributed.current().main:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return folder


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

