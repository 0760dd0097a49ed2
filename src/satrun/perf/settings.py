"""Settings of `satrun plan`, `satrun bench` and `satrun probe`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class PlanConfig:
    ranks: int = 1  # data-parallel ranks of the planned run (all nodes); memory per rank follows trainer.strategy


@dataclass
class BenchConfig:
    rates: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])  # omission rates timed against dense
    backward_rates: list[float] = field(default_factory=lambda: [0.5, 0.9, 1.0])  # the same with scheduler.omit=backward (dense forward)
    steps: int = 3  # steps x repeats timed steps per row, interleaved with the other rows' steps
    repeats: int = 3  # rounds of the rows
    heads: bool = True  # omit attention heads at the same rate as MLP channels
    profile: bool = False  # one more step per row under torch.profiler: its time in matrix products, attention, the rest


@dataclass
class ProbeConfig:
    """What `satrun probe` measures (forwards only) and, with a target, calibrates."""

    metrics: list[str] = field(default_factory=lambda: ["maxip", "contrib", "wanda", "magnitude", "random"])  # importance metrics compared
    rates: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])  # uniform MLP rates compared
    batches: int = 2  # micro-batches of training data each loss is averaged over
    layer_rate: float = 0.5  # the rate one layer at a time omits, for its sensitivity
    target_speedup: Optional[float] = None  # sparse-stage ideal speed-up to calibrate per-layer rates for
