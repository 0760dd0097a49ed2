"""The CPU tensor-memory counter: exact on known allocations, and SAT needs less than dense."""

from __future__ import annotations

import contextlib

import torch

from satrun.perf.memory import TensorMemory, peak_bytes, resident_tensors
from satrun.sat.sparsifier import Sparsifier
from satrun.training.loss import CausalLMObjective
from satrun.training.trainer import train_step
from tests.sat.models import build

CPU = torch.device("cpu")


def test_counts_storages_once_and_frees_them() -> None:
    tracker = TensorMemory(CPU)
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        view = a.view(10, 100)  # same storage: not counted again
        b = a + 1
        assert tracker.live == 8000
        del a, view, b
    assert tracker.live == 0 and tracker.peak == 8000


def test_resident_tensors_count_from_the_start() -> None:
    weights = [torch.zeros(250), torch.zeros(500)]
    assert peak_bytes(lambda: torch.ones(100).sum(), CPU, weights) == 3000 + 400 + 4  # and the 0-d sum


def _step_peak(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> int:
    step = lambda: train_step(CausalLMObjective(model), optimizer, [batch], 1.0, contextlib.nullcontext())  # noqa: E731
    return peak_bytes(step, CPU, resident_tensors(model, optimizer))


def test_sat_step_peaks_below_dense_step() -> None:
    model = build("llama-gqa")
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 97, (4, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    sparsifier = Sparsifier(model)
    train_step(CausalLMObjective(model), optimizer, [batch], 1.0, contextlib.nullcontext())  # optimizer state from here
    dense = _step_peak(model, optimizer, batch)
    assert dense == _step_peak(model, optimizer, batch)  # deterministic
    sparsifier.set_rates(0.5, 0.5, step=1)
    sparse = _step_peak(model, optimizer, batch)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert 3 * params < sparse < dense  # weights, grads and two Adam moments, plus less activation memory
