"""Settings of `satrun bench`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchConfig:
    rates: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    steps: int = 3  # steps x repeats timed steps per row, interleaved with the other rows' steps
    repeats: int = 3
    heads: bool = True  # omit attention heads at the same rate as MLP channels
