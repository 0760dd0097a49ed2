"""Token-aware SAT (``tokens=unlabelled``): tokens that carry no loss run through the kept MLP
channels, tokens that carry one through the whole layer. Exact against a dense model with
per-token masks (prompt rows masked, labelled rows full): logits and every gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from satrun.data.batches import row_split
from satrun.labels import IGNORE
from satrun.sat.settings import MetricConfig, SelectorConfig
from satrun.sat.sparsifier import Sparsifier
from satrun.training.runtime import enable_activation_checkpointing
from tests.sat.models import assert_bf16_close_to_reference, build

TOL = 1e-5


def sft_batch(vocab: int = 97) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :15], labels[1, :9], labels[1, 17:20] = IGNORE, IGNORE, IGNORE  # prompts, and a second turn's
    return {"input_ids": ids, "labels": labels, **row_split(labels)}


def run(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def per_token_reference(model: torch.nn.Module, sparsifier: Sparsifier, batch: dict) -> list:
    """Hooks on a dense model: on the sparse rows (tokens without a loss) the omitted channels'
    activations are zeroed and their mean output added; the labelled rows are left alone."""
    shape = batch["input_ids"].shape
    sparse = torch.zeros(shape.numel(), dtype=torch.bool)
    sparse[batch["free_rows"]] = True
    sparse = sparse.view(*shape, 1)
    handles = []
    for i, layer in enumerate(model.model.layers):
        sel = sparsifier.last_selection(i)
        if sel["channels"] is None:
            continue
        keep = torch.zeros(layer.mlp.gate_proj.out_features)
        keep[sel["channels"]] = 1.0
        mask = torch.where(sparse, keep, torch.ones_like(keep))  # [batch, length, channels]
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
        if sel["fill"] is not None:
            fill = sel["fill"].detach().clone()
            handles.append(layer.mlp.register_forward_hook(lambda m, a, out, fill=fill: out + sparse * fill))
    return handles


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("fill", ["zero", "mean"])
@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "mistral"])
def test_token_aware_step_equals_the_per_token_masked_reference(arch: str, fill: str) -> None:
    model = build(arch)
    reference = copy.deepcopy(model)
    sat = Sparsifier(model, MetricConfig(name="contrib", token_stride=2), SelectorConfig(fill=fill), seed=5,
                     tokens="unlabelled")
    sat.set_rates([0.5, 0.75], 0.0, step=3)
    batch = sft_batch()
    sat.set_token_rows(batch["loss_rows"], batch["free_rows"])
    logits, grads = run(model, batch)
    assert [sat.last_selection(i)["channels"].numel() for i in range(2)] == [40, 20]
    handles = per_token_reference(reference, sat, batch)
    ref_logits, ref_grads = run(reference, batch)
    for h in handles:
        h.remove()
    assert_close(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, name)
    # every channel still learns: the labelled rows give the omitted ones their gradient
    for layer in model.model.layers:
        assert bool((layer.mlp.gate_proj.weight.grad.abs().sum(1) > 0).all())


def test_scores_come_from_the_unlabelled_tokens_only() -> None:
    from satrun.sat import importance, selection

    model = build("llama-gqa")
    sat = Sparsifier(model, MetricConfig(name="contrib", token_stride=1), SelectorConfig(name="topk", fill="zero"),
                     tokens="unlabelled")
    batch = sft_batch()
    sat.set_rates(0.5, 0.0, step=0)
    sat.set_token_rows(batch["loss_rows"], batch["free_rows"])
    captured = {}
    mlp = model.model.layers[1].mlp
    mlp.register_forward_pre_hook(lambda m, a: captured.update(x=a[0].detach().reshape(-1, 48)))
    model(input_ids=batch["input_ids"], use_cache=False)

    def top(x: torch.Tensor) -> list[int]:
        scores = importance.channel_scores("contrib", x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                           1, None)
        return selection.topk(scores[None], 40)[0].tolist()

    kept = sat.last_selection(1)["channels"].tolist()
    assert kept == top(captured["x"][batch["free_rows"]])
    assert kept != top(captured["x"])  # all rows would choose otherwise


@pytest.mark.parametrize("omit", ["forward", "backward"])
def test_activation_checkpointing_reuses_the_split_and_the_selection(omit: str) -> None:
    plain = build("qwen2")
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    batch = sft_batch()
    results = []
    for model in (plain, ckpt):
        sat = Sparsifier(model, seed=5, tokens="unlabelled", omit=omit)  # sampling: a re-drawn selection would differ
        sat.set_rates(0.5, 0.0, step=2)
        sat.set_token_rows(batch["loss_rows"], batch["free_rows"])
        results.append(run(model, batch))
    assert_close(results[0][0], results[1][0], "logits")
    for name in results[0][1]:
        assert_close(results[0][1][name], results[1][1][name], name)


def test_a_batch_without_unlabelled_tokens_runs_dense() -> None:
    model = build("llama-gqa")
    reference = copy.deepcopy(model)
    sat = Sparsifier(model, tokens="unlabelled")
    sat.set_rates(0.5, 0.0, step=0)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    rows = torch.arange(20)
    sat.set_token_rows(rows, rows[:0])  # every row dense, none sparse
    logits, grads = run(model, {"input_ids": ids, "labels": ids})
    ref_logits, ref_grads = run(reference, {"input_ids": ids, "labels": ids})
    assert_close(logits, ref_logits, "logits")
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, name)
        assert torch.isfinite(grads[name]).all()


def test_rows_must_be_given_and_heads_are_kept() -> None:
    model = build("llama-gqa")
    sat = Sparsifier(model, tokens="unlabelled")
    sat.set_rates(0.5, 0.0, step=0)
    with pytest.raises(RuntimeError, match="no token rows"):
        model(input_ids=torch.zeros(1, 6, dtype=torch.long), use_cache=False)
    with pytest.raises(ValueError, match="heads are kept"):
        sat.set_rates(0.5, 0.5, step=0)
    with pytest.raises(ValueError, match="tokens="):
        Sparsifier(build("llama-gqa"), tokens="some")


def test_bf16_autocast_and_frozen_weights() -> None:
    model = build("qwen2")
    reference = copy.deepcopy(model)
    for m in (model, reference):
        for layer in m.model.layers:
            layer.mlp.up_proj.weight.requires_grad_(False)
    sat = Sparsifier(model, seed=0, tokens="unlabelled")
    sat.set_rates(0.5, 0.0, step=0)
    batch = sft_batch()
    sat.set_token_rows(batch["loss_rows"], batch["free_rows"])
    assert_bf16_close_to_reference(model, reference, lambda: per_token_reference(reference, sat, batch),  # up_proj: frozen
                                   input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
