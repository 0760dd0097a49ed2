"""Choosing which neurons to keep, given their importance scores.

Scores come as a 2-D tensor ``[rows, n]``, one row per independent choice (the sparsifier uses
one row per layer and kind: MLP channels, query heads), and ``k`` is kept in every row. Indices
come back sorted, which keeps weight gathers local.
"""

from __future__ import annotations

from typing import Optional

import torch

from satrun.sat.settings import NORMALIZE


def kept_count(n: int, rate: float, align: int = 1) -> int:
    """How many of ``n`` neurons to keep at omission ``rate``: round((1 - rate) * n), at least one,
    rounded to a multiple of ``align`` when that is possible (matrix units like multiples of 64)."""
    k = round((1.0 - rate) * n)
    if align > 1 and n >= align:
        k = align * round(k / align)
    return int(min(n, max(1 if align <= 1 or n < align else align, k)))


def kept_heads(n_q: int, n_kv: int, rate: float) -> int:
    """Query heads kept at omission ``rate``: ``kept_count(n_q, rate)`` under multi-head
    attention; under grouped-query attention the same number in each of the ``n_kv`` groups
    (``kept_count`` of a group's heads), so that the kept heads still share their KV heads evenly
    and the attention kernel takes them as grouped-query attention, without copying K and V."""
    if n_q == n_kv:
        return kept_count(n_q, rate)
    return n_kv * kept_count(n_q // n_kv, rate)


def topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest scores of each row."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def normalized(scores: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Scores mapped into [0, 1] per row, so that a temperature means the same for every metric,
    layer and scale: ``max`` divides by the row maximum (all metrics are non-negative); ``rank``
    takes each score's rank / (n - 1), which ignores how heavy the tail of the scores is (under
    ``max`` one outlier neuron pushes every other score towards 0, and sampling becomes uniform
    among them)."""
    scores = scores.float()
    if how == "rank":
        n = scores.shape[-1]
        return scores.argsort(dim=-1).argsort(dim=-1).float() / max(n - 1, 1)
    if how != "max":
        raise ValueError(f"normalize={how!r} is not one of: {', '.join(NORMALIZE)}")
    return scores / scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def sample(scores: torch.Tensor, k: int, temperature: float, generator: Optional[torch.Generator],
           normalize: str = "max") -> torch.Tensor:
    """``k`` distinct neurons per row drawn without replacement from softmax(norm(s) / temperature).

    ``norm`` is :func:`normalized` (``max``: s / max(s); ``rank``: rank / (n - 1)). The draw uses
    the Gumbel-top-k trick: adding Gumbel noise to the logits and keeping the top k is an exact
    sample of k items without replacement, in one vectorised pass.
    """
    scores = scores.float()
    logits = normalized(scores, normalize) / temperature
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(1e-20, 1.0)
    return topk(logits - torch.log(-torch.log(uniform)), k)
