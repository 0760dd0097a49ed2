"""``launcher=torchrun``: satrun starts its ranks itself, through torch.distributed's launcher API."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from satrun.config import TrainConfig
from satrun.errors import RunStopped, UsageError


def launch_ranks(cfg: TrainConfig, run_dir: Path, work: Callable[[TrainConfig, Path], dict[str, Any]]) -> dict[str, Any]:
    """Start ``launcher.nproc_per_node`` ranks on this machine with torch.distributed's own
    launcher (what torchrun --standalone does), each running ``work(cfg, run_dir)`` (the
    training, as if torchrun had started it) into the one ``run_dir``.

    Signals are the ranks' to handle (they save a checkpoint first): Ctrl-C reaches them
    directly, and a SIGTERM sent to this process alone is passed on to them. A rank that stops
    on purpose (bad input, a signal, non-finite losses) is reported here as if it were this
    process, with the same one line and exit status.
    """
    import multiprocessing
    import signal
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    def pass_on(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.launcher.nproc_per_node,
                          run_id=f"satrun-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                          max_restarts=0, monitor_interval=0.2, start_method="spawn", signals_to_handle="SIGHUP,SIGQUIT")
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, pass_on)}
    try:
        results = elastic_launch(config, _rank_main)(cfg, run_dir, work)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stopped = [r["stopped"] for r in results.values() if "stopped" in r]
    if stopped:
        kind, message, code = stopped[0]
        if kind == "usage":
            raise UsageError(message)
        error = RunStopped(message)
        error.exit_code = code
        raise error
    return results[0]


def _rank_main(cfg: TrainConfig, run_dir: Path, work: Callable[[TrainConfig, Path], dict[str, Any]]) -> dict[str, Any]:
    """One rank started by :func:`launch_ranks`: its logging, then the training; a deliberate
    stop comes back as ``{"stopped": (kind, message, exit status)}``."""
    import dataclasses
    import logging

    if os.environ.get("RANK", "0") == "0":
        run_dir.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                            handlers=[logging.StreamHandler(), logging.FileHandler(run_dir / "main.log")])
    try:
        return work(dataclasses.replace(cfg, launcher=dataclasses.replace(cfg.launcher, name="none")), run_dir)
    except UsageError as exc:
        return {"stopped": ("usage", str(exc), 2)}
    except RunStopped as exc:
        return {"stopped": ("run", str(exc), exc.exit_code)}
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
