"""The CPU tensor-memory counter: exact on known allocations, and SAT needs less than dense."""

from __future__ import annotations

import contextlib

import pytest
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


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_plans_peak_bounds_a_measured_step_closely(precision: str) -> None:
    """The plan's peak per rank (every tensor of a step summed) against the tensor bytes a real
    step of the same shape holds at its peak (second step: AdamW's moments exist)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from satrun.config import OptimConfig
    from satrun.data import collate
    from satrun.perf.flops import Shape
    from satrun.perf.plan import memory_per_rank
    from satrun.training.loss import CausalLMObjective
    from satrun.training.optim import build_optimizer
    from satrun.training.trainer import train_step

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    optimizer = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    batch = collate([(row, row.clone()) for row in ids], 0)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    step = lambda: train_step(CausalLMObjective(model), optimizer, [batch], 1.0, amp)  # noqa: E731
    step()
    measured = peak_bytes(step, torch.device("cpu"), resident_tensors(model, optimizer))
    planned = memory_per_rank(Shape.from_config(config), 1, "auto", 2 if precision == "bf16" else 4, tokens=4 * 64)["peak"]
    assert measured <= planned <= 1.3 * measured, (measured, planned)


def test_checkpointing_shrinks_the_planned_activations_to_a_layer_and_the_layer_inputs() -> None:
    from satrun.perf.flops import Shape
    from satrun.perf.plan import activation_bytes, memory_per_rank

    shape = Shape(4096, 11008, 32, 32, 32, 128, 32000)
    full, kept = activation_bytes(shape, 8192, 2), activation_bytes(shape, 8192, 2, checkpointing=True)
    assert 5 * kept < full
    layer = (activation_bytes(Shape(4096, 11008, 1, 32, 32, 128, 32000), 8192, 2) - 8192 * 8 * 32000)
    assert kept == pytest.approx(8192 * (32 * 4 * 4096 + 8 * 32000) + layer)
    assert memory_per_rank(shape, 8, "fsdp", 2, 8192, checkpointing=True)["peak"] < memory_per_rank(shape, 8, "fsdp", 2, 8192)["peak"]
