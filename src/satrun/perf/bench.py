"""Dense and SAT training steps timed side by side, in one process, on the same batches.

Each repeat runs, in turn, a plain transformers loop (``model(input_ids, labels=labels).loss``),
satrun's dense step and satrun's step at every rate; each block starts with one untimed warm-up
step. Reported per row: median step time and tokens/s, speed-up over satrun's dense step, the
FLOP model's ideal speed-up, efficiency = (measured - 1) / (ideal - 1), and the share of step
time spent scoring and selecting.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Sequence

import torch

from satrun.perf.flops import Shape, ideal_speedup
from satrun.sat.sparsifier import Sparsifier
from satrun.training import runtime
from satrun.data import label_tokens
from satrun.perf.settings import BenchConfig
from satrun.training.trainer import train_step


def _plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, grad_clip: float, amp: Any) -> None:
    with amp:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_bench(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Sparsifier,
    batches: Sequence[dict],
    cfg: BenchConfig,
    shape: Shape,
    seq_len: int,
    device: torch.device,
    amp: Any = contextlib.nullcontext(),
    grad_clip: float = 1.0,
) -> list[dict[str, Any]]:
    """One row per configuration: "plain", "dense", then each rate."""
    model.train()
    configs: list[tuple[str, float]] = [("plain", 0.0), ("dense", 0.0)] + [(f"rate {r:g}", r) for r in cfg.rates]
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    select: dict[str, list[float]] = {name: [] for name, _ in configs}
    peak: dict[str, int | None] = {name: None for name, _ in configs}
    tokens = statistics.mean(label_tokens(b) for b in batches)
    for _ in range(cfg.repeats):
        for name, rate in configs:
            sparsifier.set_rates(rate, rate if cfg.heads else 0.0, step=0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for i in range(cfg.steps + 1):  # the first step of each block is warm-up
                batch = batches[i % len(batches)]
                before = sparsifier.select_s
                runtime.synchronize(device)
                started = time.perf_counter()
                if name == "plain":
                    _plain_step(model, optimizer, batch, grad_clip, amp)
                else:
                    train_step(model, optimizer, [batch], grad_clip, amp)
                runtime.synchronize(device)
                if i:
                    times[name].append(time.perf_counter() - started)
                    select[name].append((sparsifier.select_s - before) / times[name][-1])
            peak[name] = runtime.peak_memory_bytes(device)
    dense_s = statistics.median(times["dense"])
    rows = []
    for name, rate in configs:
        step_s = statistics.median(times[name])
        ideal = ideal_speedup(shape, seq_len, rate, rate if cfg.heads else 0.0) if rate else 1.0
        measured = dense_s / step_s
        rows.append({
            "name": name,
            "rate": rate,
            "step_s": step_s,
            "step_s_spread": [min(times[name]), max(times[name])],
            "tokens_per_s": tokens / step_s,
            "speedup": measured,
            "ideal_speedup": ideal,
            "efficiency": (measured - 1) / (ideal - 1) if ideal > 1 else None,
            "overhead_share": statistics.median(select[name]),
            "peak_mem_bytes": peak[name],
        })
    return rows


def print_bench(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="satrun bench (speed-up over satrun's dense step)")
    for column in ("row", "s/step", "tokens/s", "speed-up", "ideal", "efficiency", "scoring+selection", "peak mem"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for r in rows:
        table.add_row(
            r["name"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}x",
            f"{r['ideal_speedup']:.2f}x", "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}",
            f"{100 * r['overhead_share']:.1f}%",
            "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**30:.2f} GiB",
        )
    Console().print(table)
