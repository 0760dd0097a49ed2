"""The sparse products' backward: slice gradients placed without atomic adds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from satrun.sat.sparse_ops import gathered_linear, sparse_swiglu, token_split_swiglu


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.seen.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _weights(*shapes):
    torch.manual_seed(0)
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def test_gradients_are_placed_by_copies_not_index_add_and_equal_autograd_through_the_slices() -> None:
    """index_add_ is CUDA's atomic path; the kept indices are distinct, so a copy places them."""
    x = torch.randn(6, 8, requires_grad=True)
    gate, up, down, proj = _weights((16, 8), (16, 8), (8, 16), (16, 8))
    idx = torch.tensor([1, 4, 5, 9, 12])
    rows = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4])
    with Ops() as ops:
        outputs = [sparse_swiglu(x, gate, up, down, idx), gathered_linear(x, proj, None, idx, 0),
                   gathered_linear(x[:, :5], proj.t().contiguous(), None, idx, 1),
                   token_split_swiglu(x, gate, up, down, idx, *rows)]
        sum(o.square().sum() for o in outputs).backward()
    assert "index_add" not in ops.seen and "index_add_" not in ops.seen
    got = [t.grad.clone() for t in (x, gate, up, down, proj)]
    for t in (x, gate, up, down, proj):
        t.grad = None

    def mlp(xs, g, u, d):
        return F.linear(F.silu(F.linear(xs, g)) * F.linear(xs, u), d)

    dense_rows = mlp(x[rows[0]], gate, up, down)
    sparse_rows = mlp(x[rows[1]], gate[idx], up[idx], down[:, idx])
    split = torch.empty(6, 8).index_copy(0, rows[0], dense_rows).index_copy(0, rows[1], sparse_rows)
    reference = [mlp(x, gate[idx], up[idx], down[:, idx]), F.linear(x, proj[idx]), F.linear(x[:, :5], proj.t()[:, idx]), split]
    sum(o.square().sum() for o in reference).backward()
    for g, t in zip(got, (x, gate, up, down, proj)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)


def test_regather_keeps_no_weight_slice_for_backward_and_gives_the_same_gradients() -> None:
    """Under FSDP2 the whole weights are gathered again for backward: kept slices saved from the
    forward would pin a copy of every layer's kept weights per rank. With ``regather`` only the
    indices are saved; the gradients are the same."""
    x = torch.randn(2, 8, requires_grad=True)
    gate, up, down, proj = _weights((64, 8), (64, 8), (8, 64), (64, 8))
    idx = torch.arange(0, 64, 2)
    rows = torch.tensor([0]), torch.tensor([1])
    params = {t.untyped_storage().data_ptr() for t in (gate, up, down, proj)}
    results = {}
    for regather in (False, True):
        saved = [0]

        def pack(t):  # type: ignore[no-untyped-def]
            if t.untyped_storage().data_ptr() not in params and t.dim() == 2 and t.shape[0] * t.shape[1] >= 256:
                saved[0] += t.numel()  # weight-sized tensors that are not the weights themselves
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = [sparse_swiglu(x, gate, up, down, idx, regather), gathered_linear(x, proj, None, idx, 0, regather),
                       token_split_swiglu(x, gate, up, down, idx, *rows, None, regather)]
        sum(o.square().sum() for o in outputs).backward()
        results[regather] = (saved[0], [t.grad.clone() for t in (x, gate, up, down, proj)])
        for t in (x, gate, up, down, proj):
            t.grad = None
    assert results[False][0] > 0 and results[True][0] == 0
    for a, b in zip(results[False][1], results[True][1]):
        torch.testing.assert_close(a, b)
