"""trainer.compile: compiled decoder layers train like eager ones, dense and through SAT's
stages, compiling again only when a stage changes the kept counts."""

from __future__ import annotations

import copy

import pytest
import torch

from satrun.config import ModelConfig, OptimConfig
from satrun.data import collate
from satrun.models import load_model
from satrun.sat.settings import MetricConfig, SelectorConfig
from satrun.sat.sparsifier import Sparsifier
from satrun.training.loss import CausalLMObjective
from satrun.training.optim import build_optimizer
from satrun.training.runtime import compile_layers
from satrun.training.trainer import train_step

# a ladder: two sparse stages, then dense; (MLP rate, attention rate) per step
STEPS = [(0.5, 0.5), (0.5, 0.5), (0.25, 0.25), (0.25, 0.25), (0.0, 0.0)]


@pytest.mark.slow
def test_compiled_layers_equal_eager_over_a_ladder_and_compile_once_per_stage(tokenizer) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = load_model(ModelConfig(name="tiny", source="random"), tokenizer)
    compiled = copy.deepcopy(eager)
    runs = []
    for model in (eager, compiled):
        sat = Sparsifier(model, MetricConfig(), SelectorConfig(name="topk", fill="mean"), seed=0)
        runs.append((model, sat, build_optimizer(model, OptimConfig(lr=1e-3)), CausalLMObjective(model)))
    assert compile_layers(compiled) == 2
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = collate([(row, row.clone()) for row in ids], 0)
    losses: dict[int, list[float]] = {0: [], 1: []}
    graphs = []
    for step, (mlp, attn) in enumerate(STEPS):
        for i, (model, sat, optimizer, objective) in enumerate(runs):
            sat.set_rates(mlp, attn, step=step)
            loss, *_ = train_step(objective, optimizer, [batch], 1.0, torch.autocast("cpu", enabled=False))
            losses[i].append(float(loss))
        graphs.append(counters["stats"]["unique_graphs"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    new = [graphs[0]] + [b - a for a, b in zip(graphs, graphs[1:])]
    assert new[0] > 0
    starts = {0, 2, 4}  # the first step of each stage
    assert all(new[s] == 0 for s in range(len(STEPS)) if s not in starts), new  # no recompile within a stage


@pytest.mark.slow
def test_compiled_layers_equal_eager_with_the_backward_omission(tokenizer) -> None:
    """scheduler.omit=backward: the MLP (its selection runs inside its forward) stays outside the
    compiled graphs, the rest of each layer inside; training equals eager at rates 0.5, 1 and 0."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = load_model(ModelConfig(name="tiny", source="random"), tokenizer)
    compiled = copy.deepcopy(eager)
    runs = []
    for model in (eager, compiled):
        sat = Sparsifier(model, MetricConfig(), SelectorConfig(name="topk"), seed=0, omit="backward")
        runs.append((model, sat, build_optimizer(model, OptimConfig(lr=1e-3)), CausalLMObjective(model)))
    assert compile_layers(compiled) == 2
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = collate([(row, row.clone()) for row in ids], 0)
    losses: dict[int, list[float]] = {0: [], 1: []}
    for step, rate in enumerate([0.5, 0.5, 1.0, 0.0]):
        for i, (model, sat, optimizer, objective) in enumerate(runs):
            sat.set_rates(rate, 0.0, step=step)
            loss, *_ = train_step(objective, optimizer, [batch], 1.0, torch.autocast("cpu", enabled=False))
            losses[i].append(float(loss))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for a, b in zip(eager.parameters(), compiled.parameters()):  # within a tenth of one AdamW step (lr 1e-3): an
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)    # element whose gradient is near 0 moves by noise
