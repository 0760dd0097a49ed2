"""Dense and SAT training steps timed side by side, in one process, on the same batches.

The rows are a plain transformers loop (``model(input_ids, labels=labels).loss``, CPT only),
satrun's dense step and satrun's step at every rate. They are interleaved one step at a time, in
a rotating order, after one untimed round: on a noisy machine a slow spell then hits every row
alike. Every row of a round trains on the same batch, except in SFT the row "dense, padded, full
head": satrun's dense step as it was before packing (micro-batches of whole chats padded to the
longest, the LM head at every position) on the chats of its own stream. Reported per row: median
step time and labelled tokens/s, speed-up over satrun's dense step (the median over rounds of
the row's labelled tokens/s over the dense step's, both timed in that round; on the same batch
that is the ratio of step times), the FLOP model's ideal speed-up (labelled tokens per FLOP,
against the dense step), efficiency = (measured - 1) / (ideal - 1), the share of step time spent
scoring and selecting, peak memory; with ``bench.profile`` also one profiled step's time in
matrix products, the attention kernel and the rest.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

from satrun.perf.flops import Shape, step_flops, token_flops
from satrun.perf.memory import peak_bytes, resident_tensors
from satrun.sat.sparsifier import Sparsifier
from satrun.training import runtime
from satrun.data import label_tokens, token_counts, token_rows
from satrun.perf.settings import BenchConfig
from satrun.training.loss import CausalLMObjective, causal_lm_loss
from satrun.training.trainer import train_step


def _plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, grad_clip: float, amp: Any) -> None:
    with amp:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _SatrunStep:
    """satrun's training step: the batch hook hands a token-aware sparsifier its rows;
    ``every_position`` runs the LM head everywhere (the step before the labelled-only head)."""

    def __init__(self, sparsifier: Sparsifier, every_position: bool = False) -> None:
        hooks = [] if sparsifier.tokens == "all" else [lambda b: sparsifier.set_token_rows(*token_rows(b))]
        self.hooks, self.every_position = hooks, every_position

    def __call__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, grad_clip: float,
                 amp: Any) -> None:
        if self.every_position:  # the loss with the head everywhere (no sparsifier is on in that row)
            train_step(lambda b, n: causal_lm_loss(model, b, n, every_position=True), optimizer, [batch], grad_clip, amp)
        else:
            train_step(CausalLMObjective(model, self.hooks), optimizer, [batch], grad_clip, amp)


def _configure(sparsifier: Sparsifier, rate: Any, attn_rate: float, omit: str) -> None:
    """A row's form and rates (step 0: every row draws alike)."""
    sparsifier.omit = omit
    sparsifier.set_rates(rate, attn_rate, step=0)


def _quartiles(values: list[float]) -> list[float]:
    """First and third quartiles (inclusive method; both the value itself for one sample)."""
    if len(values) < 2:
        return [values[0], values[0]]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return [first, third]


PADDED = "dense, padded, full head"  # SFT: satrun's dense step before packing and the labelled-only head


def run_bench(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Sparsifier,
    batches: Sequence[dict],
    cfg: BenchConfig,
    shape: Shape,
    device: torch.device,
    amp: Any = contextlib.nullcontext(),
    grad_clip: float = 1.0,
    peak_flops: float | None = None,
    layer_rates: Sequence[float] | None = None,
    layer_attn_rate: float = 0.0,
    padded_batches: Sequence[dict] | None = None,
    layer_omit: str = "forward",
) -> list[dict[str, Any]]:
    """One row per configuration: "plain" (CPT) or, given ``padded_batches`` (SFT: the same
    chats unpacked), "dense, padded, full head"; "dense"; then each rate (MLP channels, and
    heads at the same rate with ``cfg.heads``; MLP channels only where the sparsifier omits
    neurons for unlabelled tokens only), each of ``cfg.backward_rates`` as "backward <rate>" (the
    forward dense, the sparse tokens' MLP backward on the kept channels: ``omit=backward``), then
    with ``layer_rates`` a row "layer rates" at those per-layer MLP rates (the first stage's
    under ``scheduler.layer_scale``), ``layer_attn_rate`` and ``layer_omit``. With ``peak_flops`` (the device's peak in the step's precision), each
    row also gets its model FLOP utilisation."""
    model.train()
    token_aware = sparsifier.tokens != "all"
    heads = cfg.heads and not token_aware
    first = (PADDED, 0.0, 0.0, "forward") if padded_batches is not None else ("plain", 0.0, 0.0, "forward")
    configs: list[tuple[str, Any, float, str]] = [first, ("dense", 0.0, 0.0, "forward")]
    configs += [(f"rate {r:g}", r, r if heads else 0.0, "forward") for r in cfg.rates]
    configs += [(f"backward {r:g}", r, 0.0, "backward") for r in cfg.backward_rates]
    if layer_rates is not None:
        configs.append(("layer rates", tuple(layer_rates), layer_attn_rate, layer_omit))
    steps: dict[str, Callable[..., None]] = {"plain": _plain_step, PADDED: _SatrunStep(sparsifier, every_position=True)}
    satrun_step = _SatrunStep(sparsifier)
    data = {name: padded_batches if name == PADDED else batches for name, *_ in configs}
    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    labelled: dict[str, list[int]] = {name: [] for name, *_ in configs}
    select: dict[str, list[float]] = {name: [] for name, *_ in configs}
    for round_ in range(cfg.repeats * cfg.steps + 1):  # round 0 is warm-up
        shift = round_ % len(configs)  # rotate the order: no row always runs first
        for name, rate, attn_rate, omit in configs[shift:] + configs[:shift]:
            batch = data[name][round_ % len(data[name])]
            _configure(sparsifier, rate, attn_rate, omit)
            before = sparsifier.select_s
            runtime.synchronize(device)
            started = time.perf_counter()
            steps.get(name, satrun_step)(model, optimizer, batch, grad_clip, amp)
            runtime.synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - started)
                labelled[name].append(label_tokens(batch))
                select[name].append((sparsifier.select_s - before) / times[name][-1])
    peak = {}
    for name, rate, attn_rate, omit in configs:  # one more, untimed step each: counting memory slows the step on CPU
        _configure(sparsifier, rate, attn_rate, omit)
        step = steps.get(name, satrun_step)
        peak[name] = peak_bytes(lambda: step(model, optimizer, data[name][0], grad_clip, amp), device,
                                resident_tensors(model, optimizer))
    shares = {}
    for name, rate, attn_rate, omit in configs if cfg.profile else ():
        _configure(sparsifier, rate, attn_rate, omit)
        step = steps.get(name, satrun_step)
        shares[name] = time_by_kind(lambda: step(model, optimizer, data[name][0], grad_clip, amp), device)
    align, layers, tokens_mode = sparsifier.selector.align_on(device.type), sparsifier.layers, sparsifier.tokens

    def flops_per_label(name: str, rate: Any, attn_rate: float, omit: str) -> float:
        """The FLOP model's training FLOPs per labelled token of the row's batches."""
        total = 0.0
        for b in data[name]:
            length = b["input_ids"].shape[1]
            if name in (PADDED, "plain"):  # every position through the whole model, head included
                total += b["input_ids"].numel() * token_flops(shape, length).train
            else:
                total += step_flops(shape, length, token_counts(b), rate, attn_rate, align, layers, tokens_mode, omit)
        return total / sum(label_tokens(b) for b in data[name])

    dense_cost = flops_per_label("dense", 0.0, 0.0, "forward")
    dense_rate = [n / t for n, t in zip(labelled["dense"], times["dense"])]
    rows = []
    for name, rate, attn_rate, omit in configs:
        step_s = statistics.median(times[name])
        tokens = statistics.mean(labelled[name])
        cost = flops_per_label(name, rate, attn_rate, omit)
        ideal = dense_cost / cost
        flops = tokens * cost  # the work this row really does per step
        ratios = [n / t / d for n, t, d in zip(labelled[name], times[name], dense_rate)]  # paired: same round
        measured = statistics.median(ratios)
        rows.append({
            "name": name,
            "rate": rate if isinstance(rate, float) else sum(rate) / len(rate),  # layer rates: their mean
            "omit": omit,
            "step_s": step_s,
            "step_s_spread": [min(times[name]), max(times[name])],
            "step_s_samples": times[name],
            "tokens_per_step": tokens,  # label tokens: SAT's per-weight costs weigh less as they grow
            "tokens_per_s": tokens / step_s,
            "speedup": measured,
            "speedup_quartiles": _quartiles(ratios),
            "ideal_speedup": ideal,
            # (measured - 1) / (ideal - 1) means nothing where the ideal gain is within noise
            "efficiency": (measured - 1) / (ideal - 1) if abs(ideal - 1) > 0.02 else None,
            "overhead_share": statistics.median(select[name]),
            "peak_mem_bytes": peak[name],
            "mfu": flops / step_s / peak_flops if peak_flops else None,
            "profile_s": shares.get(name),
        })
    return rows


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}


def time_by_kind(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Seconds one call of ``step`` spends in matrix products, in the attention kernel and in
    everything else (each operator's own time, by torch.profiler; on CUDA the device's time),
    and its wall time. The FLOP model counts the first two only: the rest (norms, activations,
    element-wise products, copies, the optimizer's update) sets how much of an ideal speed-up
    a step can show."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runtime.synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        runtime.synchronize(device)
    wall = time.perf_counter() - started
    kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        own = (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total) / 1e6
        if event.key in MATMUL_OPS:
            kinds["matmul"] += own
        elif "scaled_dot_product" in event.key or "flash_attention" in event.key:
            kinds["attention"] += own
        else:
            kinds["other"] += own
    return {**kinds, "wall": wall}


def print_bench(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    dense = next((r for r in rows if r["name"] == "dense"), None)
    tokens = f", {dense['tokens_per_step']:.0f} labelled tokens per step" if dense else ""
    table = Table(title=f"satrun bench (labelled tokens/s against satrun's dense step{tokens})")
    for column in ("row", "s/step", "labelled tokens/s", "speed-up", "ideal", "efficiency", "scoring+selection", "peak mem", "MFU"):
        table.add_column(column, justify="left" if column == "row" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["name"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}x",
            f"{r['ideal_speedup']:.2f}x", "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}",
            f"{100 * r['overhead_share']:.1f}%",
            "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**30:.2f} GiB",
            "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        )
    console = Console(width=None if sys.stdout.isatty() else 130)
    console.print(table)
    profiled = [r for r in rows if r.get("profile_s")]
    if not profiled:
        return
    kinds = Table(title="where a step's time goes (bench.profile: one profiled step per row, each operator's own time)")
    for column in ("row", "matrix products", "attention kernel", "the rest", "profiled step"):
        kinds.add_column(column, justify="left" if column == "row" else "right", no_wrap=True)
    for r in profiled:
        p = r["profile_s"]
        kinds.add_row(r["name"], *(f"{p[k]:.3f} s" for k in ("matmul", "attention", "other", "wall")))
    console.print(kinds)
