"""Settings of the SAT method: which importance metric, which selector, which omission schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class MetricConfig:
    """How neurons are scored (see docs/method.md for each formula and its cost)."""

    name: str = "maxip"  # random | magnitude | wanda | maxip | contrib
    token_stride: int = 16  # maxip and contrib score every token_stride-th token of the micro-batch


@dataclass
class SelectorConfig:
    """How the kept neurons are chosen from their scores."""

    name: str = "sampling"  # topk | sampling
    temperature: float = 0.05  # sampling: softmax(normalized(s) / temperature)
    normalize: str = "max"  # sampling: max (s / max(s)) | rank (rank / (n - 1))
    align: int = 1  # kept MLP channels are rounded to a multiple of this (e.g. 64 on GPUs)


@dataclass
class SchedulerConfig:
    """Omission rate over training, and where it applies.

    dense: rate 0 throughout (the model is not touched). constant: ``rate`` throughout.
    ladder (LORS): ``rate`` for the first ``sparse_fraction`` of steps, then ``ladder_steps``
    equal stages whose rate falls by rate / (ladder_steps + 1) each, then dense for the last
    ``dense_fraction`` of steps.

    ``layer_rates`` gives each decoder layer its own MLP omission rate in the sparse stage (in
    place of ``rate``; one value per layer, 0 = that layer stays dense); ladder rungs scale every
    layer's rate alike. ``satrun probe`` calibrates such a vector from measured sensitivities.
    """

    name: str = "ladder"  # dense | constant | ladder
    rate: float = 0.5  # omission rate of MLP channels
    attn_rate: Optional[float] = 0.0  # omission rate of attention heads; None = rate
    sparse_fraction: float = 0.5
    ladder_steps: int = 4
    dense_fraction: float = 0.1
    layers: Optional[list[int]] = None  # decoder layers to sparsify; None = all
    layer_rates: Optional[list[float]] = None  # MLP rate per decoder layer (replaces rate); None = rate everywhere
