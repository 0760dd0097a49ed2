"""Settings of the SAT method: which importance metric, which selector, which omission schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The choices of the SAT settings, named once (the config validates against them, the library too).
SELECTORS = ("topk", "sampling")
NORMALIZE = ("max", "rank")
FILLS = ("zero", "mean")
SPARSE_TOKENS = ("all", "unlabelled")  # which tokens omit neurons (the config adds auto)
OMIT = ("forward", "backward")  # where neurons are omitted: the paper's sub-network, or the backward only


@dataclass
class MetricConfig:
    """How neurons are scored (see docs/method.md for each formula and its cost)."""

    name: str = "contrib"  # random | magnitude | wanda | maxip | contrib
    token_stride: int = 8  # maxip and contrib score every token_stride-th token of the micro-batch


@dataclass
class SelectorConfig:
    """How the kept neurons are chosen from their scores."""

    name: str = "sampling"  # topk | sampling
    temperature: float = 0.05  # sampling: softmax(normalized(s) / temperature)
    normalize: str = "rank"  # sampling: max (s / max(s)) | rank (rank / (n - 1))
    align: Optional[int] = None  # kept MLP channels are rounded to a multiple of this; null: 64 on CUDA, 1 elsewhere
    # What omitted MLP channels output: zero (the paper), or mean: their mean output over the
    # scored tokens, added to the layer's output as a constant (no gradient), which removes the
    # sub-network's systematic shortfall.
    fill: str = "mean"  # omitted MLP channels add their mean output (mean) or nothing (zero)

    def align_on(self, device_type: str) -> int:
        """The rounding of kept MLP channel counts on a device of this type: ``align``, or by
        default 64 on CUDA, where a matrix dimension that is not a multiple of 8 (better 64) makes
        cuBLAS leave its fastest bf16 kernels (Llama-2-7B's ladder rungs would otherwise keep
        6605, 7706, 8806, 9907 of 11008 channels), and 1 (the exact rate) on CPU."""
        if self.align is not None:
            return self.align
        return 64 if device_type == "cuda" else 1


@dataclass
class SchedulerConfig:
    """Omission rate over training, and where it applies.

    dense: rate 0 throughout (the model is not touched). constant: ``rate`` throughout.
    ladder (LORS): ``rate`` for the first ``sparse_fraction`` of steps, then ``ladder_steps``
    equal stages whose rate falls by rate / (ladder_steps + 1) each, then dense for the last
    ``dense_fraction`` of steps.

    ``layer_scale`` spreads the MLP rate over the decoder layers: layer l omits
    ``rate * layer_scale[l]`` (one value per layer, mean 1 keeps ``rate`` the mean rate; 0 keeps
    a layer dense); ladder rungs scale every layer alike. ``satrun probe`` calibrates it from
    measured sensitivities; conf/calibration/<model>_<mode>_<scheduler>_<adapter>.yaml holds a model's calibration.

    ``tokens=unlabelled`` omits neurons only for the tokens that carry no loss (in SFT the
    prompts, the template and padding); the tokens that carry one run the full layers.

    ``omit=backward`` keeps every forward dense (the model trains against the hidden states it
    produces) and runs the MLP backward of the sparse tokens on the kept channels only; its rate
    may be 1 (those tokens' MLP branch passes no gradient). Attention heads are not omitted.
    """

    name: str = "ladder"  # dense | constant | ladder
    rate: float = 0.5  # omission rate of MLP channels
    attn_rate: Optional[float] = 0.0  # omission rate of attention heads; None = rate
    sparse_fraction: float = 0.5  # ladder: share of steps at the full rate
    ladder_steps: int = 4  # ladder: rungs of falling rate (a short run takes those that fit)
    dense_fraction: float = 0.1  # ladder: share of steps at the end trained dense
    layers: Optional[list[int]] = None  # decoder layers to sparsify; None = all
    layer_scale: Optional[list[float]] = None  # layer l's MLP rate is rate * layer_scale[l]; None = rate everywhere
    tokens: str = "auto"  # which tokens omit neurons: all | unlabelled (those without a loss; SFT) | auto (unlabelled in SFT, all in CPT)
    omit: str = "forward"  # forward: the kept sub-network runs forward and backward (the paper) | backward: dense forward, the sparse tokens' MLP backward on the kept channels (rate 1: none)

    def heads_rate(self) -> float:
        """The omission rate of attention heads: ``attn_rate``, or ``rate`` where it is None."""
        return self.rate if self.attn_rate is None else self.attn_rate
