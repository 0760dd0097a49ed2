"""Matrix products on a subset of a weight's rows or columns, with slice-only gradients.

Differentiating through ``W[idx]`` makes autograd run a gather op and its backward (a
full-size scatter) for every weight use, keeping the gathered copy alive for backward through
generic machinery. These functions gather once, multiply, and in backward compute the products
for the kept slice only, placing it into one zero-filled full-size gradient that they return
through autograd as the weight's gradient (as large as the dense gradient, which the optimizer
needs anyway). Rows that were not kept receive exactly zero gradient. Because the gradient
travels through autograd, gradient accumulation, DDP's and FSDP's reduction hooks and
gradient clipping see it like any other.

Mixed precision is handled here rather than by autocast: when autocast is on, the input and the
gathered weight slices are cast once to its dtype, the products run in that dtype with autocast
off, and the low-precision slices are what is kept for backward, on any device.

``regather``: keep only the indices and gather the slices again in backward, from the weight as
it is then. For FSDP2, whose whole weights exist only while a layer computes and are gathered
again for its backward: kept slices would pin a copy of every layer's kept weights per rank
for the whole forward, whatever the number of ranks (about 4 GB at Llama-2-7B, rate 0.5).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in here, or x's own dtype without autocast."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _full_grad(param: torch.Tensor, dim: int, idx: Optional[torch.Tensor], grad_slice: torch.Tensor) -> torch.Tensor:
    """The full-size gradient of ``param``: ``grad_slice`` at ``idx`` along ``dim``, zero elsewhere.

    A copy, not an add: the kept indices are distinct, and on CUDA ``index_add_`` takes the
    atomic path (slower, and its float sums in no fixed order). The buffer is full-size
    because AdamW updates every element (its moments move omitted rows too), and it travels
    through autograd because DDP's and FSDP2's reductions hook into autograd's accumulation;
    under gradient accumulation autograd then adds it to ``.grad``, as it adds dense gradients."""
    grad_slice = grad_slice.to(param.dtype)
    if idx is None:
        return grad_slice
    return torch.zeros_like(param).index_copy_(dim, idx, grad_slice)


class _GatheredLinear(torch.autograd.Function):
    """y = x @ W[idx].T + b[idx] (dim 0: a subset of outputs), or x @ W[:, idx].T + b (dim 1)."""

    @staticmethod
    def forward(ctx, x, weight, bias, idx, dim, regather):  # type: ignore[no-untyped-def]
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        w = weight.index_select(dim, idx).to(dtype)
        b = None if bias is None else (bias.index_select(0, idx) if dim == 0 else bias).to(dtype)
        ctx.save_for_backward(xc, None if regather else w, idx)
        ctx.weight, ctx.bias, ctx.dim, ctx.in_dtype, ctx.dtype = weight, bias, dim, x.dtype, dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(xc, w, b)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        x, w, idx = ctx.saved_tensors
        if w is None:
            w = ctx.weight.index_select(ctx.dim, idx).to(ctx.dtype)
        g = grad_out.to(w.dtype)
        grad_x = (g @ w).to(ctx.in_dtype)
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = _full_grad(ctx.weight, ctx.dim, idx, g2.t() @ x.reshape(-1, x.shape[-1]))
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            grad_b = _full_grad(ctx.bias, 0, idx if ctx.dim == 0 else None, g2.sum(0))
        return grad_x, grad_w, grad_b, None, None, None


def gathered_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor, dim: int,
    regather: bool = False,
) -> torch.Tensor:
    """A linear layer restricted to output rows ``idx`` (dim=0) or input columns ``idx`` (dim=1).

    For dim=1, ``x`` holds only the kept input features, in the order of ``idx``.
    """
    return _GatheredLinear.apply(x, weight, bias, idx, dim, regather)


class _SparseSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) on the kept intermediate channels ``idx`` only."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, idx, regather):  # type: ignore[no-untyped-def]
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        g_w, u_w, d_w = _kept(w_gate, w_up, w_down, idx, dtype)
        with torch.autocast(x.device.type, enabled=False):
            gate = F.linear(xc, g_w)
            up = F.linear(xc, u_w)
            act = F.silu(gate)
            out = F.linear(act * up, d_w)
        slices = (None, None, None) if regather else (g_w, u_w, d_w)
        ctx.save_for_backward(xc, gate, act, up, *slices, idx)  # what dense autograd keeps, less act*up
        ctx.params, ctx.in_dtype, ctx.dtype = (w_gate, w_up, w_down), x.dtype, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        x, gate, act, up, g_w, u_w, d_w, idx = ctx.saved_tensors
        w_gate, w_up, w_down = ctx.params
        if g_w is None:
            g_w, u_w, d_w = _kept(w_gate, w_up, w_down, idx, ctx.dtype)
        k = idx.numel()
        dy = grad_out.to(d_w.dtype).reshape(-1, grad_out.shape[-1])
        grad_x, parts = _swiglu_backward(dy, x.reshape(-1, x.shape[-1]), gate.reshape(-1, k), up.reshape(-1, k), g_w, u_w,
                                         d_w, ctx.needs_input_grad, act.reshape(-1, k))
        grad_gate, grad_up, grad_down = (None if part is None else _full_grad(w, 1 if i == 2 else 0, idx, part)
                                         for i, (w, part) in enumerate(zip((w_gate, w_up, w_down), parts)))
        return (grad_x.view(grad_out.shape[:-1] + (x.shape[-1],)).to(ctx.in_dtype), grad_gate, grad_up, grad_down,
                None, None)


def _kept(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, idx: torch.Tensor,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept channels' rows of W_gate and W_up and columns of W_down, in ``dtype``."""
    return (w_gate.index_select(0, idx).to(dtype), w_up.index_select(0, idx).to(dtype),
            w_down.index_select(1, idx).to(dtype))


def sparse_swiglu(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, idx: torch.Tensor,
    regather: bool = False,
) -> torch.Tensor:
    """The SwiGLU MLP of Llama-family models computed on channels ``idx`` (sorted, int64)."""
    return _SparseSwiGLU.apply(x, w_gate, w_up, w_down, idx, regather)


class _TokenSplitSwiGLU(torch.autograd.Function):
    """The SwiGLU MLP with its input rows split: ``dense_rows`` through every channel,
    ``sparse_rows`` through the kept channels ``idx`` only (plus the constant ``fill``).

    One function rather than two paths joined by autograd: each weight's gradient is one
    full-size product (the dense rows') into which the sparse rows' kept-slice product is added
    in place, with no zero-filled buffer and no second full-size gradient to sum."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, idx, dense_rows, sparse_rows, fill, regather):  # type: ignore[no-untyped-def]
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        full = tuple(w.to(dtype) for w in (w_gate, w_up, w_down))
        kept = _kept(*full, idx, dtype)
        out = torch.empty(x.shape[0], w_down.shape[0], dtype=dtype, device=x.device)
        saved = []
        with torch.autocast(x.device.type, enabled=False):
            for rows, (g_w, u_w, d_w) in ((dense_rows, full), (sparse_rows, kept)):
                xr = xc.index_select(0, rows)
                gate, up = F.linear(xr, g_w), F.linear(xr, u_w)
                act = F.silu(gate)
                y = F.linear(act * up, d_w)
                if fill is not None and rows is sparse_rows:
                    y += fill.to(dtype)
                out.index_copy_(0, rows, y)
                saved += [xr, gate, act, up]
        if regather:  # the weights themselves (gathered again by FSDP2 for backward) are cast and sliced again there
            full, kept = (None,) * 3, (None,) * 3
        ctx.save_for_backward(*saved, *full, *kept, idx, dense_rows, sparse_rows)
        ctx.params, ctx.in_dtype, ctx.dtype = (w_gate, w_up, w_down), x.dtype, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        (x_d, gate_d, act_d, up_d, x_s, gate_s, act_s, up_s, wg, wu, wd, wg_k, wu_k, wd_k, idx, dense_rows,
         sparse_rows) = ctx.saved_tensors
        paths = ((x_d, gate_d, act_d, up_d), (x_s, gate_s, act_s, up_s))
        weights = ((wg, wu, wd), (wg_k, wu_k, wd_k))
        if wg is None:  # regather: cast (and slice) the weights as they are now
            full = tuple(w.to(ctx.dtype) for w in ctx.params)
            weights = (full, _kept(*full, idx, ctx.dtype))
        w_gate, w_up, w_down = ctx.params
        want = ctx.needs_input_grad
        g = grad_out.to(weights[0][2].dtype)
        grad_x = torch.empty(g.shape[0], w_gate.shape[1], dtype=g.dtype, device=g.device)
        grads: list = [None, None, None]  # gate, up, down: the dense rows' full products first
        for path, rows, (xr, gate, act, up), (g_w, u_w, d_w) in zip(range(2), (dense_rows, sparse_rows), paths, weights):
            d_x, parts = _swiglu_backward(g.index_select(0, rows), xr, gate, up, g_w, u_w, d_w, want, act)
            grad_x.index_copy_(0, rows, d_x)
            if path == 0:
                grads = parts
            else:
                _add_kept(grads, parts, idx, ctx.params)
        grads = [None if gr is None else gr.to(p.dtype) for gr, p in zip(grads, ctx.params)]
        return grad_x.to(ctx.in_dtype), *grads, None, None, None, None, None


def token_split_swiglu(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, idx: torch.Tensor,
    dense_rows: torch.Tensor, sparse_rows: torch.Tensor, fill: Optional[torch.Tensor] = None, regather: bool = False,
) -> torch.Tensor:
    """The SwiGLU MLP on the rows of ``x`` (``[tokens, hidden]``): ``dense_rows`` through every
    channel, ``sparse_rows`` through channels ``idx`` only, plus ``fill`` (no gradient)."""
    return _TokenSplitSwiGLU.apply(x, w_gate, w_up, w_down, idx, dense_rows, sparse_rows, fill, regather)


class _ExactForwardSwiGLU(torch.autograd.Function):
    """The dense SwiGLU MLP forward on every row of ``x`` (``[tokens, hidden]``); in backward the
    ``dense_rows`` get the full products and the ``sparse_rows`` products on the channels that
    ``choose`` keeps only (both None: every row is sparse). ``choose(x_sparse, hidden_sparse)``
    sees the sparse rows' input and SwiGLU activations from this forward and returns the kept
    channels (sorted, int64); ``choose=None`` keeps none: the sparse rows' MLP branch then
    carries no gradient at all, and their activations are not kept for backward.

    The two row sets are computed apart (the rows of ``x`` gathered, the outputs scattered back:
    hidden-wide copies, not intermediate-wide ones), and only what backward reads is kept: the
    dense rows' input, gate and up outputs, the sparse rows' input and the kept columns of their
    gate and up outputs."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, dense_rows, sparse_rows, choose, regather):  # type: ignore[no-untyped-def]
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        full = tuple(w.to(dtype) for w in (w_gate, w_up, w_down))
        idx = None
        with torch.autocast(x.device.type, enabled=False):
            if sparse_rows is None:  # every row sparse: no row gathers at all
                xs, dense_saved, out = xc, (None, None, None), None
            else:  # each row set computed apart: only hidden-wide tensors are gathered and scattered
                xd, xs = xc.index_select(0, dense_rows), xc.index_select(0, sparse_rows)
                gate_d, up_d = F.linear(xd, full[0]), F.linear(xd, full[1])
                out = torch.empty(x.shape[0], w_down.shape[0], dtype=dtype, device=x.device)
                out.index_copy_(0, dense_rows, F.linear(F.silu(gate_d) * up_d, full[2]))
                dense_saved = (xd, gate_d, up_d)
            gate_s, up_s = F.linear(xs, full[0]), F.linear(xs, full[1])
            hidden_s = F.silu(gate_s) * up_s
            out_s = F.linear(hidden_s, full[2])
        if choose is not None:
            idx = choose(xs, hidden_s)
            sparse_saved = (xs, gate_s.index_select(1, idx), up_s.index_select(1, idx))
        else:
            sparse_saved = (None, None, None)
        if out is None:
            out = out_s
        else:
            out.index_copy_(0, sparse_rows, out_s)
        kept_w = (None,) * 3 if regather or idx is None else _kept(*full, idx, dtype)
        full_w = (None,) * 3 if regather else full
        ctx.save_for_backward(*dense_saved, *sparse_saved, *full_w, *kept_w, idx, dense_rows, sparse_rows)
        ctx.params, ctx.in_dtype, ctx.dtype, ctx.rows = (w_gate, w_up, w_down), x.dtype, dtype, x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        (x_d, gate_d, up_d, x_s, gate_s, up_s, wg, wu, wd, wg_k, wu_k, wd_k, idx, dense_rows,
         sparse_rows) = ctx.saved_tensors
        if wg is None:  # regather: cast (and slice) the weights as they are now
            wg, wu, wd = (w.to(ctx.dtype) for w in ctx.params)
            if idx is not None:
                wg_k, wu_k, wd_k = _kept(wg, wu, wd, idx, ctx.dtype)
        want = ctx.needs_input_grad
        g = grad_out.to(wd.dtype)
        all_sparse, no_sparse_grad = sparse_rows is None, idx is None
        grads: list = [None, None, None]  # gate, up, down
        grad_x = None
        if not all_sparse:  # the dense rows: the full products
            d_x, grads = _swiglu_backward(g.index_select(0, dense_rows), x_d, gate_d, up_d, wg, wu, wd, want)
            if want[0]:  # the sparse rows' part stays zero at rate 1
                grad_x = g.new_zeros(ctx.rows, wg.shape[1]).index_copy_(0, dense_rows, d_x)
        if not no_sparse_grad:  # the sparse rows: the kept channels' products, added into the full-size gradients
            dy = g if all_sparse else g.index_select(0, sparse_rows)
            d_x, parts = _swiglu_backward(dy, x_s, gate_s, up_s, wg_k, wu_k, wd_k, want)
            if want[0]:
                grad_x = d_x if all_sparse else grad_x.index_copy_(0, sparse_rows, d_x)
            _add_kept(grads, parts, idx, ctx.params)
        # every row sparse at rate 1: zeros, not None (under DDP every parameter, the layer's norm
        # upstream among them, must get a gradient)
        if want[0] and grad_x is None:
            grad_x = g.new_zeros(ctx.rows, wg.shape[1])
        for i, p in enumerate(ctx.params):
            if want[i + 1] and grads[i] is None:
                grads[i] = torch.zeros_like(p)
        grads = [None if gr is None else gr.to(p.dtype) for gr, p in zip(grads, ctx.params)]
        return (None if grad_x is None else grad_x.to(ctx.in_dtype)), *grads, None, None, None, None


def _swiglu_backward(dy: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, w_gate: torch.Tensor,
                     w_up: torch.Tensor, w_down: torch.Tensor, want: tuple,
                     act: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list]:
    """The SwiGLU MLP's input gradient and its weights' gradients (gate, up, down; None where
    ``want``, autograd's ``needs_input_grad`` of (x, w_gate, w_up, w_down, ...), says no) for rows
    ``x`` with gate and up outputs ``gate`` and ``up`` on the channels of the weights given;
    ``act`` is silu(gate) where it was kept."""
    act = F.silu(gate) if act is None else act
    d_hidden = dy @ w_down
    d_up = d_hidden * act
    d_gate = torch.ops.aten.silu_backward(d_hidden.mul_(up), gate)  # one fused pass, as dense autograd
    grads = [d_gate.t() @ x if want[1] else None, d_up.t() @ x if want[2] else None,
             dy.t() @ (act * up) if want[3] else None]
    return torch.addmm(d_gate @ w_gate, d_up, w_up), grads


def _add_kept(grads: list, parts: list, idx: torch.Tensor, params: tuple) -> None:
    """Add the kept channels' weight gradients ``parts`` (rows ``idx`` of W_gate and W_up,
    columns of W_down) into the full-size ``grads``, in place and without index_add_'s atomics;
    a full-size gradient that does not exist yet starts at zero."""
    for i, part in enumerate(parts):
        if part is None:
            continue
        dim = 1 if i == 2 else 0
        if grads[i] is None:
            grads[i] = torch.zeros_like(params[i], dtype=part.dtype).index_copy_(dim, idx, part)
        else:
            grads[i].index_copy_(dim, idx, grads[i].index_select(dim, idx).add_(part))


def exact_forward_swiglu(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    dense_rows: Optional[torch.Tensor], sparse_rows: Optional[torch.Tensor], choose, regather: bool = False,
) -> torch.Tensor:
    """The SwiGLU MLP on the rows of ``x`` (``[tokens, hidden]``), computed densely; its backward
    restricted to the channels ``choose`` keeps for ``sparse_rows`` (both row sets None: every
    row sparse; ``choose=None``: no channel, so those rows' MLP branch passes no gradient)."""
    return _ExactForwardSwiGLU.apply(x, w_gate, w_up, w_down, dense_rows, sparse_rows, choose, regather)


def in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. during activation-checkpoint recompute."""
    return torch._C._current_graph_task_id() != -1
