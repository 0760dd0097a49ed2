"""The one harness for tests that need two CPU ranks in one process group (gloo)."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def on_two_ranks(work: Callable[..., Any], *args: Any, timeout: float = 120.0) -> dict[int, Any]:
    """``work(rank, join, *args)`` in two spawned processes, one thread each; ``join()`` joins
    them in a gloo process group (left again when ``work`` returns), so that ``work`` may do
    something alone first. Returns each rank's result; a rank that fails fails the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(rank, port, work, args, results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a rank exited with {p.exitcode}"
    failed = {rank: value for rank, value in got.items() if isinstance(value, _Failed)}
    assert not failed, failed
    return got


class _Failed(str):
    """A rank's exception, as text."""


def _rank(rank: int, port: int, work: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def join() -> None:
        dist.init_process_group("gloo", rank=rank, world_size=2)

    try:
        results.put((rank, work(rank, join, *args)))
    except Exception as exc:  # reported by the test, not lost in the child's stderr
        import traceback

        results.put((rank, _Failed("".join(traceback.format_exception(exc))[-3000:])))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
