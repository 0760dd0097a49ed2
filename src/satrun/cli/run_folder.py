"""A refused command leaves its run folder as it found it.

Hydra writes ``.hydra/`` (config, overrides) and opens the job's log in the run folder before
satrun sees the config, so a start that is then refused (bad settings, a run already in the
folder, a resume whose settings differ) would leave the rejected settings in place of the run's
own, or a folder holding nothing but them. :class:`RunFolderGuard`, a Hydra callback, notes the
folder before Hydra writes; :func:`restore` puts it back when the start is refused before the
run wrote anything of its own.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

HYDRA_SUBDIR = ".hydra"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class Snapshot:
    folder: Path
    existed: bool
    hydra_files: dict[str, bytes]  # .hydra/<name> -> its bytes
    log_sizes: dict[str, int]  # <name>.log -> its size
    metrics: Optional[tuple[int, int]]  # metrics.jsonl's (size, mtime_ns): changed once the run wrote records

    @classmethod
    def take(cls, folder: Path) -> "Snapshot":
        hydra = folder / HYDRA_SUBDIR
        return cls(folder, folder.is_dir(),
                   {p.name: p.read_bytes() for p in sorted(hydra.iterdir()) if p.is_file()} if hydra.is_dir() else {},
                   {p.name: p.stat().st_size for p in folder.glob("*.log")} if folder.is_dir() else {},
                   _stat(folder / METRICS))


_taken: list[Snapshot] = []


class RunFolderGuard(Callback):  # type: ignore[misc]
    """Hydra callback: notes the run folder before Hydra writes into it."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        _taken[:] = [Snapshot.take(Path(str(config.hydra.run.dir)))]


def restore() -> bool:
    """Put the run folder back as :class:`RunFolderGuard` found it, unless the run has written
    records meanwhile (then it started, and what it wrote stays). True if restored."""
    if not _taken:
        return False
    snap = _taken.pop()
    if _stat(snap.folder / METRICS) != snap.metrics:
        return False
    hydra = snap.folder / HYDRA_SUBDIR
    if hydra.is_dir():
        for path in hydra.iterdir():
            if path.is_file() and path.name not in snap.hydra_files:
                path.unlink()
    for name, content in snap.hydra_files.items():
        (hydra / name).write_bytes(content)
    if hydra.is_dir() and not any(hydra.iterdir()):
        hydra.rmdir()
    for log in snap.folder.glob("*.log") if snap.folder.is_dir() else []:
        if log.name not in snap.log_sizes:
            log.unlink()
        elif log.stat().st_size > snap.log_sizes[log.name]:
            with log.open("r+b") as handle:
                handle.truncate(snap.log_sizes[log.name])
    if not snap.existed and snap.folder.is_dir() and not any(snap.folder.iterdir()):
        shutil.rmtree(snap.folder)
    return True


def _stat(path: Path) -> Optional[tuple[int, int]]:
    if not path.is_file():
        return None
    st = path.stat()
    return st.st_size, st.st_mtime_ns
