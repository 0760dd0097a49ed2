"""The fused, chunked cross-entropy equals the plain logits path: loss and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from satrun.data.sft import IGNORE
from satrun.training import loss as loss_module
from satrun.training.loss import causal_lm_loss, linear_cross_entropy
from tests.sat.models import build


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


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_fused_loss_and_gradients_equal_the_logits_path(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 97 * 16)  # several chunks, the last one short
    model = build(arch)
    batch = _batch(97)
    expected = _reference(model, batch)
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = causal_lm_loss(model, batch, 50)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_without_gradients_only_the_loss_is_computed() -> None:
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    targets = torch.tensor([1, 2, IGNORE, 4, 5, 6, 7, 8, 9, IGNORE])
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets)
    expected = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE, reduction="sum")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bf16_autocast_stays_close_to_the_logits_path() -> None:
    model = build("llama-gqa")
    batch = _batch(97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(model, batch)
        got = causal_lm_loss(model, batch, 50)
    assert got.item() == pytest.approx(expected.item(), rel=1e-2)


def test_evaluation_builds_no_gradient_buffers() -> None:
    from satrun.perf.memory import TensorMemory

    hidden, weight = torch.randn(8, 256, requires_grad=True), torch.randn(4000, 256, requires_grad=True)
    targets = torch.randint(0, 4000, (8,))
    tracker = TensorMemory(torch.device("cpu"))
    tracker.track([hidden, weight, targets])
    inputs = tracker.live
    with torch.no_grad(), tracker:
        linear_cross_entropy(hidden, weight, targets)
    assert tracker.peak - inputs < weight.numel() * 4  # a gradient of the head's weight alone would be this big
