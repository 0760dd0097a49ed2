"""One optimizer step: what it waits for, and how it skips a non-finite update."""

from __future__ import annotations

import copy
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from satrun.config import DataConfig, ModelConfig, OptimConfig
from satrun.data import BatchStream, build_corpus
from satrun.models import load_model
from satrun.sat.settings import MetricConfig, SelectorConfig
from satrun.sat.sparsifier import Sparsifier
from satrun.training.loss import CausalLMObjective
from satrun.training.optim import build_optimizer
from satrun.training.trainer import step_unless_non_finite, train_step


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (``.item()``, ``bool()``, ``.tolist()``):
    on a GPU each waits for every kernel queued before it. transformers' own mask building
    reads one per forward (it looks for packed sequences in the position ids; not under
    torch.compile), in dense and SAT steps alike: that one is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.reads += not any(frame.filename.endswith("masking_utils.py") for frame in traceback.extract_stack())
        return func(*args, **(kwargs or {}))


def _setup(tmp_path: Path, tokenizer):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"line {i} of a short text to train on, with some words" for i in range(60)))
    torch.manual_seed(0)
    model = load_model(ModelConfig(name="tiny", source="random"), tokenizer)
    corpus = build_corpus(DataConfig(name="text", format="text", path=str(text)), "cpt", tokenizer, 16, 2, 0)
    batches = [next(BatchStream(corpus.train, 2, corpus.pad_id, 0)) for _ in range(2)]
    return model, batches


@pytest.mark.parametrize("selector", [None, "topk", "sampling"])
def test_a_training_step_never_reads_a_device_value_on_the_host(tmp_path, tokenizer, selector):
    """Token counts come from the host batches, the non-finite guard goes into the fused
    optimizer's kernel, SAT scores and selects on the device: nothing in the step waits for it."""
    model, batches = _setup(tmp_path, tokenizer)
    if selector is not None:
        sparsifier = Sparsifier(model, MetricConfig(), SelectorConfig(name=selector, fill="mean"))
        sparsifier.set_rates(0.5, 0.5, step=0)
    objective = CausalLMObjective(model)
    optimizer = build_optimizer(model, OptimConfig())
    before = copy.deepcopy(model.state_dict())
    with HostReads() as mode:
        loss, grad_norm, tokens, _ = train_step(objective, optimizer, batches, 1.0, torch.autocast("cpu", enabled=False))
    assert mode.reads == 0
    assert tokens > 0 and torch.isfinite(loss) and grad_norm > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it did step


def test_a_non_finite_step_leaves_parameters_and_optimizer_state_alone(tmp_path, tokenizer):
    model, batches = _setup(tmp_path, tokenizer)
    optimizer = build_optimizer(model, OptimConfig())
    assert optimizer.defaults["fused"]
    objective = CausalLMObjective(model)
    train_step(objective, optimizer, batches[:1], 1.0, torch.autocast("cpu", enabled=False))  # state exists
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_unless_non_finite(optimizer, torch.tensor(False))
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    for key, values in state["state"].items():
        for name, value in values.items():
            assert torch.equal(value, after[key][name]), (key, name)
    step_unless_non_finite(optimizer, torch.tensor(True))  # and a finite flag steps
    assert any(not torch.equal(params[k], v) for k, v in model.state_dict().items())
