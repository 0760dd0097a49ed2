"""Dense and SAT training steps timed side by side, in one process, on the same batches.

The rows are a plain transformers loop (``model(input_ids, labels=labels).loss``), satrun's dense
step and satrun's step at every rate. They are interleaved one step at a time, in a rotating
order, after one untimed round: on a noisy machine a slow spell then hits every row alike. Every
row of a round trains on the same batch. Reported per row: median step time and tokens/s,
speed-up over satrun's dense step (the median over rounds of the dense step's time over the
row's, both timed in that round on that batch), the FLOP model's ideal speed-up, efficiency =
(measured - 1) / (ideal - 1), the share of step time spent scoring and selecting, peak memory.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

from satrun.perf.flops import Shape, ideal_speedup, token_flops
from satrun.perf.memory import peak_bytes, resident_tensors
from satrun.sat.sparsifier import Sparsifier
from satrun.training import runtime
from satrun.data import label_tokens
from satrun.perf.settings import BenchConfig
from satrun.training.loss import CausalLMObjective
from satrun.training.trainer import train_step


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the CUDA device name.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def bf16_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, where it is known (None on CPU and on unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if key in name), None)


def _plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, grad_clip: float, amp: Any) -> None:
    with amp:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _satrun_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, grad_clip: float, amp: Any) -> None:
    train_step(CausalLMObjective(model), optimizer, [batch], grad_clip, amp)


def _quartiles(values: list[float]) -> list[float]:
    """First and third quartiles (inclusive method; both the value itself for one sample)."""
    if len(values) < 2:
        return [values[0], values[0]]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return [first, third]


def _step_of(name: str) -> Callable[..., None]:
    return _plain_step if name == "plain" else _satrun_step


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
    peak_flops: float | None = None,
    layer_rates: Sequence[float] | None = None,
    layer_attn_rate: float = 0.0,
) -> list[dict[str, Any]]:
    """One row per configuration: "plain", "dense", then each rate (MLP channels, and heads at
    the same rate with ``cfg.heads``), then with ``layer_rates`` a row "layer rates" at those
    per-layer MLP rates (the first stage's under ``scheduler.layer_scale``) and ``layer_attn_rate``. With ``peak_flops`` (the device's peak in the
    step's precision), each row also gets its model FLOP utilisation."""
    model.train()
    configs: list[tuple[str, Any, float]] = [("plain", 0.0, 0.0), ("dense", 0.0, 0.0)]
    configs += [(f"rate {r:g}", r, r if cfg.heads else 0.0) for r in cfg.rates]
    if layer_rates is not None:
        configs.append(("layer rates", tuple(layer_rates), layer_attn_rate))
    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    select: dict[str, list[float]] = {name: [] for name, *_ in configs}
    tokens = statistics.mean(label_tokens(b) for b in batches)
    for round_ in range(cfg.repeats * cfg.steps + 1):  # round 0 is warm-up
        shift = round_ % len(configs)  # rotate the order: no row always runs first
        batch = batches[round_ % len(batches)]
        for name, rate, attn_rate in configs[shift:] + configs[:shift]:
            sparsifier.set_rates(rate, attn_rate, step=0)
            before = sparsifier.select_s
            runtime.synchronize(device)
            started = time.perf_counter()
            _step_of(name)(model, optimizer, batch, grad_clip, amp)
            runtime.synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - started)
                select[name].append((sparsifier.select_s - before) / times[name][-1])
    peak = {}
    for name, rate, attn_rate in configs:  # one more, untimed step each: counting memory slows the step on CPU
        sparsifier.set_rates(rate, attn_rate, step=0)
        step = _step_of(name)
        peak[name] = peak_bytes(lambda: step(model, optimizer, batches[0], grad_clip, amp), device,
                                resident_tensors(model, optimizer))
    rows = []
    for name, rate, attn_rate in configs:
        step_s = statistics.median(times[name])
        align, layers = sparsifier.selector.align, sparsifier.layers
        sparse = name not in ("plain", "dense")
        ideal = ideal_speedup(shape, seq_len, rate, attn_rate, align, layers) if sparse else 1.0
        flops = tokens * token_flops(shape, seq_len, rate, attn_rate, align, layers).train  # the work this row really does
        ratios = [d / t for d, t in zip(times["dense"], times[name])]  # paired: same round, same batch
        measured = statistics.median(ratios)
        rows.append({
            "name": name,
            "rate": rate if isinstance(rate, float) else sum(rate) / len(rate),  # layer rates: their mean
            "step_s": step_s,
            "step_s_spread": [min(times[name]), max(times[name])],
            "step_s_samples": times[name],
            "tokens_per_step": tokens,  # label tokens: SAT's per-weight costs weigh less as they grow
            "tokens_per_s": tokens / step_s,
            "speedup": measured,
            "speedup_quartiles": _quartiles(ratios),
            "ideal_speedup": ideal,
            # (measured - 1) / (ideal - 1) means nothing where the ideal gain is within noise
            "efficiency": (measured - 1) / (ideal - 1) if ideal > 1.02 else None,
            "overhead_share": statistics.median(select[name]),
            "peak_mem_bytes": peak[name],
            "mfu": flops / step_s / peak_flops if peak_flops else None,
        })
    return rows


def print_bench(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    tokens = f", {rows[0]['tokens_per_step']:.0f} tokens per step" if rows else ""
    table = Table(title=f"satrun bench (speed-up over satrun's dense step{tokens})")
    for column in ("row", "s/step", "tokens/s", "speed-up", "ideal", "efficiency", "scoring+selection", "peak mem", "MFU"):
        table.add_column(column, justify="left" if column == "row" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["name"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}x",
            f"{r['ideal_speedup']:.2f}x", "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}",
            f"{100 * r['overhead_share']:.1f}%",
            "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**30:.2f} GiB",
            "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        )
    Console(width=None if sys.stdout.isatty() else 130).print(table)
