"""Matrix products on a subset of a weight's rows or columns, with slice-only gradients.

Differentiating through ``W[idx]`` makes autograd build a full-size zero gradient and scatter
the slice into it for every op. These functions instead compute the gradient of the kept slice
only and add it into ``W.grad`` in place (allocating ``W.grad`` once per optimizer step, as a
dense backward would). Rows that were not kept receive exactly zero gradient. Their autograd
graph therefore returns no gradient for the weights, only for the input.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.amp import custom_bwd, custom_fwd


def _accumulate(param: torch.Tensor, dim: int, idx: torch.Tensor, grad_slice: torch.Tensor) -> None:
    """param.grad[idx along dim] += grad_slice, creating a zero gradient if there is none yet."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    param.grad.index_add_(dim, idx, grad_slice.to(param.grad.dtype))


class _GatheredLinear(torch.autograd.Function):
    """y = x @ W[idx].T + b[idx] (dim 0: a subset of outputs) or y = x[..., :] @ W[:, idx].T + b (dim 1)."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, idx, dim):  # type: ignore[no-untyped-def]
        w = weight.index_select(dim, idx).to(x.dtype)
        if dim == 0:
            b = bias.index_select(0, idx) if bias is not None else None
        else:
            b = bias
        ctx.save_for_backward(x, w, idx)
        ctx.weight, ctx.bias, ctx.dim = weight, bias, dim
        return F.linear(x, w, b.to(x.dtype) if b is not None else None)

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        x, w, idx = ctx.saved_tensors
        grad_x = grad_out @ w
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_w = g2.t() @ x2  # the kept slice's gradient, in the slice's own layout
        _accumulate(ctx.weight, ctx.dim, idx, grad_w)
        if ctx.bias is not None and ctx.dim == 0:
            _accumulate(ctx.bias, 0, idx, g2.sum(0))
        elif ctx.bias is not None:  # the outputs are not sliced: the bias gradient is full-size
            grad_b = g2.sum(0).to(ctx.bias.dtype)
            ctx.bias.grad = grad_b if ctx.bias.grad is None else ctx.bias.grad.add_(grad_b)
        return grad_x, None, None, None, None


def gathered_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor, dim: int
) -> torch.Tensor:
    """A linear layer restricted to output rows ``idx`` (dim=0) or input columns ``idx`` (dim=1).

    For dim=1, ``x`` holds only the kept input features, in the order of ``idx``.
    """
    return _GatheredLinear.apply(x, weight, bias, idx, dim)


class _SparseSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) on the kept intermediate channels ``idx`` only."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, w_gate, w_up, w_down, idx):  # type: ignore[no-untyped-def]
        g_w = w_gate.index_select(0, idx).to(x.dtype)
        u_w = w_up.index_select(0, idx).to(x.dtype)
        d_w = w_down.index_select(1, idx).to(x.dtype)
        gate = F.linear(x, g_w)
        up = F.linear(x, u_w)
        hidden = F.silu(gate) * up
        ctx.save_for_backward(x, gate, up, g_w, u_w, d_w, idx)
        ctx.params = (w_gate, w_up, w_down)
        return F.linear(hidden, d_w)

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        x, gate, up, g_w, u_w, d_w, idx = ctx.saved_tensors
        w_gate, w_up, w_down = ctx.params
        width = x.shape[-1]
        x2 = x.reshape(-1, width)
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        gate2, up2 = gate.reshape(-1, idx.numel()), up.reshape(-1, idx.numel())
        sig = torch.sigmoid(gate2)
        act = gate2 * sig
        _accumulate(w_down, 1, idx, dy.t() @ (act * up2))
        d_hidden = dy @ d_w
        d_up = d_hidden * act
        d_gate = d_hidden * up2 * sig * (1 + gate2 * (1 - sig))
        _accumulate(w_gate, 0, idx, d_gate.t() @ x2)
        _accumulate(w_up, 0, idx, d_up.t() @ x2)
        grad_x = d_gate @ g_w + d_up @ u_w
        return grad_x.view_as(x), None, None, None, None


def sparse_swiglu(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """The SwiGLU MLP of Llama-family models computed on channels ``idx`` (sorted, int64)."""
    return _SparseSwiGLU.apply(x, w_gate, w_up, w_down, idx)
