"""``omit=backward``: the forward stays dense, the backward of the sparse rows (every row, or the
unlabelled ones under the token split) runs on the kept MLP channels only. Exact against a dense
model whose MLPs pass gradients through the kept channels only on those rows: the logits equal
the dense model's, every gradient the masked reference's."""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from satrun.sat.settings import MetricConfig, SelectorConfig
from satrun.sat.sparse_ops import exact_forward_swiglu
from satrun.sat.sparsifier import Sparsifier
from tests.sat.models import build
from tests.sat.test_token_split import assert_close, run, sft_batch


def masked_backward_reference(model: torch.nn.Module, sparsifier: Sparsifier, batch: dict,
                              sparse: Optional[torch.Tensor], rates: list[float]) -> None:
    """Patch the dense model's MLPs: the forward is unchanged, but on the sparse rows (``sparse``:
    a bool per flat row; None: every row) the omitted channels' activations reach the output
    through detached weights and activations only, so no gradient flows through them."""
    shape = batch["input_ids"].shape
    rows = torch.ones(shape.numel(), dtype=torch.bool) if sparse is None else sparse
    rows = rows.view(*shape, 1)
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        keep = torch.zeros(mlp.gate_proj.out_features)
        if rates[i] == 0.0:
            keep[:] = 1.0
        elif rates[i] < 1.0:
            keep[sparsifier.last_selection(i)["channels"]] = 1.0
        mask = torch.where(rows, keep, torch.ones_like(keep))

        def forward(x: torch.Tensor, mlp: torch.nn.Module = mlp, mask: torch.Tensor = mask) -> torch.Tensor:
            hidden = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
            w = mlp.down_proj.weight
            return F.linear(hidden * mask, w) + F.linear((hidden * (1 - mask)).detach(), w.detach())
        mlp.forward = forward


def check(arch: str, rates: list[float], tokens: str, batch: dict, tol_grad: float = 1e-5) -> Sparsifier:
    model = build(arch)
    dense, reference = copy.deepcopy(model), copy.deepcopy(model)
    sat = Sparsifier(model, MetricConfig(name="contrib"), SelectorConfig(), seed=5, tokens=tokens, omit="backward")
    sat.set_rates(rates, 0.0, step=3)
    sparse = None
    if tokens == "unlabelled":
        sat.set_token_rows(batch["loss_rows"], batch["free_rows"])
        sparse = torch.zeros(batch["input_ids"].numel(), dtype=torch.bool)
        sparse[batch["free_rows"]] = True
    logits, grads = run(model, batch)
    dense_logits, dense_grads = run(dense, batch)
    diff = (logits - dense_logits).abs().max().item()
    assert diff <= 1e-6, f"logits against dense: max abs diff {diff:.2e}"  # the forward is dense's
    masked_backward_reference(reference, sat, batch, sparse, rates)
    ref_logits, ref_grads = run(reference, batch)
    assert grads.keys() == ref_grads.keys() == dense_grads.keys()
    for name, grad in ref_grads.items():
        diff = (grads[name] - grad).abs().max().item()
        assert diff <= tol_grad, f"{name}: max abs diff {diff:.2e}"
    return sat


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "mistral"])
def test_token_split_backward_equals_the_masked_reference(arch: str) -> None:
    sat = check(arch, [0.5, 0.75], "unlabelled", sft_batch())
    assert [sat.last_selection(i)["channels"].numel() for i in range(2)] == [40, 20]


@pytest.mark.parametrize("arch", ["llama-mha", "qwen2"])
def test_every_row_sparse_equals_the_masked_reference(arch: str) -> None:
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    check(arch, [0.6, 0.3], "all", {"input_ids": ids, "labels": ids})


def test_rate_one_passes_no_gradient_through_the_sparse_rows_mlp() -> None:
    batch = sft_batch()
    sat = check("llama-gqa", [1.0, 1.0], "unlabelled", batch)
    assert sat.last_selection(0)["channels"] is None  # nothing was scored or chosen
    ids = batch["input_ids"]
    check("llama-gqa", [1.0, 0.0], "all", {"input_ids": ids, "labels": ids})


def test_rate_one_keeps_only_the_dense_rows_activations() -> None:
    """At rate 1 the sparse rows' activations are not kept for backward, and the weights'
    gradients are the dense rows' products alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g, requires_grad=True)
    w = [(0.3 * torch.randn(*s, generator=g)).requires_grad_() for s in ((12, 8), (12, 8), (8, 12))]
    dense_rows, sparse_rows = torch.tensor([1, 4, 7]), torch.tensor([0, 2, 3, 5, 6, 8, 9])
    out = exact_forward_swiglu(x, *w, dense_rows, sparse_rows, None)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None and t.dim() == 2 and t.shape[0] == 10]
    assert saved == []  # no tensor of every row is kept
    reference = F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])
    assert_close(out, reference, "forward")
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x, *w)]
    for t in (x, *w):
        t.grad = None
    part = x[dense_rows]
    F.linear(F.silu(F.linear(part, w[0])) * F.linear(part, w[1]), w[2]).square().sum().backward()
    assert_close(grads[0][sparse_rows], torch.zeros(7, 8), "sparse rows' input gradient")
    for got, t in zip(grads, (x, *w)):
        assert_close(got, t.grad, "gradient")


def test_bf16_autocast_matches_the_masked_reference() -> None:
    model = build("llama-gqa")
    reference, dense = copy.deepcopy(model), copy.deepcopy(model)
    sat = Sparsifier(model, seed=0, tokens="unlabelled", omit="backward")
    sat.set_rates(0.5, 0.0, step=0)
    batch = sft_batch()
    sat.set_token_rows(batch["loss_rows"], batch["free_rows"])
    sparse = torch.zeros(batch["input_ids"].numel(), dtype=torch.bool)
    sparse[batch["free_rows"]] = True
    losses = []
    for m in (model, dense, reference):
        if m is reference:
            masked_backward_reference(reference, sat, batch, sparse, [0.5, 0.5])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-2 * losses[1]  # bf16 rounding of the same forward
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert (p.grad - ref.grad).norm() <= 0.05 * ref.grad.norm() + 1e-6, name


def test_settings_the_backward_form_refuses() -> None:
    model = build("llama-gqa")
    sat = Sparsifier(model, omit="backward")
    with pytest.raises(ValueError, match="MLP channels only"):
        sat.set_rates(0.5, 0.5, step=0)
    with pytest.raises(ValueError, match="omit="):
        Sparsifier(build("llama-gqa"), omit="sideways")
    forward = Sparsifier(build("llama-gqa"))
    with pytest.raises(ValueError, match="below 1"):
        forward.set_rates(1.0, 0.0, step=0)
