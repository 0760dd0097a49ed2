"""Importance of MLP channels and attention heads, scored from a layer's input.

``x`` is the normalised input of the block, shape ``[tokens, hidden]``. Every metric returns
non-negative scores: ``[intermediate]`` for channels, ``[query_heads]`` for heads. The formulas
(docs/method.md):

random     uniform noise, no weights or activations read.
magnitude  channel i: |W_gate[i]|_1 + |W_up[i]|_1 + |W_down[:, i]|_1;
           head h:    |W_q[rows of h]|_1 + |W_o[:, cols of h]|_1.
wanda      channel i: sum_k (|W_gate[i, k]| + |W_up[i, k]|) * ||X[:, k]||_2;
           head h:    sum over rows r of h, sum_k |W_q[r, k]| * ||X[:, k]||_2.
maxip      channel i: max_t |silu(x_t . g_i) * (x_t . u_i)|;
           head h:    max_t ||q_{t,h}|| * ||k_{t,kv(h)}|| (a bound on its largest logit),
           both over every ``stride``-th token only, so the cost is 1/stride of a projection.
contrib    a neuron's contribution to the block output, over every ``stride``-th token:
           channel i: ||act[:, i]||_2 * ||W_down[:, i]||_2 with act = silu(X g_i) * (X u_i);
           head h:    sqrt(sum_t ||W_o[:, cols of h] v_{t,kv(h)}||^2), the output the head would
           write if it attended to token t alone (its attention weights are not computed).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

METRICS = ("random", "magnitude", "wanda", "maxip", "contrib")
# How ranks combine their scores under data parallelism (each rank scores its own tokens):
# "max" of maxima, "l2" the root of summed squares (contrib is an L2 norm over tokens), "sum".
REDUCE = {"random": "sum", "magnitude": "sum", "wanda": "sum", "maxip": "max", "contrib": "l2"}


def _column_norms(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each column. A sum of squares, not ``torch.linalg.vector_norm(x, dim=0)``:
    on CPU that reduction across rows ran about 10x slower (1.3 ms against 0.13 ms for a
    684 x 1536 activation), a few percent of a sparse MLP step."""
    x = x.float()
    return x.mul(x).sum(0).sqrt_()


def activations(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, stride: int) -> torch.Tensor:
    """silu(x g_i) * (x u_i) of every channel on every ``stride``-th token: ``[tokens / stride, i]``."""
    sub = x[::stride].to(w_gate.dtype)
    return F.silu(sub @ w_gate.t(), inplace=True).mul_(sub @ w_up.t())


def channel_scores(
    metric: str,
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    stride: int,
    generator: Optional[torch.Generator],
    act: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Channel scores; ``act`` may pass in :func:`activations` of the same x and stride (maxip and
    contrib read it instead of computing it again)."""
    n = w_gate.shape[0]
    if metric == "random":
        return torch.rand(n, generator=generator, device=w_gate.device)
    if metric == "magnitude":
        return w_gate.abs().sum(1) + w_up.abs().sum(1) + w_down.abs().sum(0)
    if metric == "wanda":
        norms = _column_norms(x).to(w_gate.dtype)
        return w_gate.abs() @ norms + w_up.abs() @ norms
    if metric == "maxip":
        act = activations(x, w_gate, w_up, stride) if act is None else act
        return act.abs().amax(0)
    if metric == "contrib":
        act = activations(x, w_gate, w_up, stride) if act is None else act
        return _column_norms(act).mul_(_column_norms(w_down)).to(act.dtype)
    raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")


def head_scores(
    metric: str,
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    head_dim: int,
    stride: int,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    n_q, n_kv = w_q.shape[0] // head_dim, w_k.shape[0] // head_dim
    if metric == "random":
        return torch.rand(n_q, generator=generator, device=w_q.device)
    if metric == "magnitude":
        return w_q.abs().sum(1).view(n_q, head_dim).sum(1) + w_o.abs().sum(0).view(n_q, head_dim).sum(1)
    if metric == "wanda":
        norms = _column_norms(x).to(w_q.dtype)
        return (w_q.abs() @ norms).view(n_q, head_dim).sum(1)
    if metric == "maxip":
        sub = x[::stride].to(w_q.dtype)
        q = (sub @ w_q.t()).view(-1, n_q, head_dim).norm(dim=-1)
        k = (sub @ w_k.t()).view(-1, n_kv, head_dim).norm(dim=-1)
        return (q * k.repeat_interleave(n_q // n_kv, dim=1)).amax(0)
    if metric == "contrib":
        sub = x[::stride].to(w_q.dtype)
        v = (sub @ w_v.t()).view(-1, n_kv, head_dim).repeat_interleave(n_q // n_kv, dim=1)  # [t, n_q, d]
        blocks = w_o.view(w_o.shape[0], n_q, head_dim)  # [hidden, n_q, d]: head h's columns of W_o
        out = torch.einsum("thd,ohd->tho", v, blocks)  # head h's output for token t's value alone
        return torch.linalg.vector_norm(out, dim=(0, 2))
    raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
