"""The fused, chunked cross-entropy equals the plain logits path: loss and every gradient, with
torch's implementation (``IMPLEMENTATION = "torch"``) and with satrun's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from satrun.labels import IGNORE
from satrun.training import loss as loss_module
from satrun.training.loss import causal_lm_loss, linear_cross_entropy
from tests.sat.models import build

IMPLEMENTATIONS = ["torch", "satrun"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(loss_module, "IMPLEMENTATION", request.param)
    return request.param


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, :7] = IGNORE  # an SFT-style prompt
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0  # padding
    labels[2, 15:] = IGNORE
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _reference(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum") / 50


def test_torch_is_the_default() -> None:
    assert loss_module.IMPLEMENTATION == "torch"


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_fused_loss_and_gradients_equal_the_logits_path(arch: str, implementation: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 97 * 16)  # several chunks, the last one short
    model = build(arch)
    batch = _batch(97)
    expected = _reference(model, batch)
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = causal_lm_loss(model, batch, 50)
    got.backward()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_flag_selects_the_implementation(implementation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = F.linear_cross_entropy
    monkeypatch.setattr(F, "linear_cross_entropy", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    hidden, weight = torch.randn(10, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets = torch.tensor([1, 2, IGNORE, 4, 5, 6, 7, 8, 9, IGNORE])
    linear_cross_entropy(hidden, weight, targets).backward()
    if implementation == "satrun":
        assert calls == []
    else:
        assert len(calls) == 1 and calls[0]["reduction"] == "sum" and calls[0]["ignore_index"] == IGNORE
        options = calls[0]["options"]  # chunked (not torch's reference path), in satrun's chunk size
        assert options.batch_chunk_size == loss_module.CHUNK_ELEMENTS // 30 and options.chunking_method is None
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # 16-bit computation: always satrun's own path
        linear_cross_entropy(hidden, weight, targets)
    assert calls == []


def test_an_unknown_implementation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_module, "IMPLEMENTATION", "triton")
    with pytest.raises(ValueError, match="IMPLEMENTATION"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]))


def test_both_implementations_agree_with_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 300 * 7)  # 7 rows a chunk
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(50, 16, generator=g), torch.randn(300, 16, generator=g) * 0.3
    targets = torch.randint(0, 300, (50,), generator=g)
    targets[::4] = IGNORE
    results = {}
    for name in IMPLEMENTATIONS:
        monkeypatch.setattr(loss_module, "IMPLEMENTATION", name)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, targets)
        (loss * 0.5).backward()  # backward scales the precomputed gradients by the upstream gradient
        results[name] = loss.detach(), h.grad, w.grad
    for got, want in zip(results["torch"], results["satrun"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_without_gradients_only_the_loss_is_computed(implementation: str) -> None:
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    targets = torch.tensor([1, 2, IGNORE, 4, 5, 6, 7, 8, 9, IGNORE])
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets)
    expected = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE, reduction="sum")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():  # every target ignored: zero, not NaN
        assert linear_cross_entropy(hidden, weight, torch.full((10,), IGNORE)).item() == 0.0


def test_bf16_autocast_stays_close_to_the_logits_path(implementation: str) -> None:
    model = build("llama-gqa")
    batch = _batch(97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(model, batch)
        got = causal_lm_loss(model, batch, 50)
    assert got.dtype == torch.float32  # summed in fp32, not in the autocast dtype
    assert got.item() == pytest.approx(expected.item(), rel=1e-2)


def test_evaluation_builds_no_gradient_buffers(implementation: str) -> None:
    from satrun.perf.memory import TensorMemory

    hidden, weight = torch.randn(8, 256, requires_grad=True), torch.randn(4000, 256, requires_grad=True)
    targets = torch.randint(0, 4000, (8,))
    tracker = TensorMemory(torch.device("cpu"))
    tracker.track([hidden, weight, targets])
    inputs = tracker.live
    with torch.no_grad(), tracker:
        linear_cross_entropy(hidden, weight, targets)
    assert tracker.peak - inputs < weight.numel() * 4  # a gradient of the head's weight alone would be this big


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_head_at_labelled_positions_only_equals_the_head_everywhere(arch: str, implementation: str) -> None:
    """The LM head runs on the gathered rows whose target carries a label (a collated batch's
    ``loss_rows``): the loss and every gradient equal the head at every position, masked."""
    from satrun.data.batches import row_split

    model = build(arch)
    batch = _batch(97)
    batch.update(row_split(batch["labels"]))
    assert batch["loss_rows"].numel() < batch["labels"].numel() - 10  # prompt and padding rows are left out
    results = []
    for every_position in (True, False):
        model.zero_grad()
        loss = causal_lm_loss(model, batch, 50, every_position=every_position)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_grads), (only, only_grads) = results
    assert abs(only.item() - full.item()) <= 1e-6 * full.item()
    for name, grad in full_grads.items():
        assert (only_grads[name] - grad).abs().max().item() <= 1e-6, name


def test_a_micro_batch_without_labels_gives_zero_loss_and_gradients(implementation: str) -> None:
    from satrun.data.batches import row_split

    model = build("llama-gqa")
    batch = _batch(97)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    batch.update(row_split(batch["labels"]))
    loss = causal_lm_loss(model, batch, 1)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
