"""satrun probe's parts: sub-network losses, layer sensitivity and the per-layer calibration."""

from __future__ import annotations

import pytest
import torch

from satrun.perf import probe
from satrun.perf.flops import Shape, ideal_speedup
from satrun.sat import MetricConfig, SelectorConfig
from tests.sat.models import build

SMOLLM2 = Shape(576, 1536, 30, 9, 3, 64, 49152, tied=True)
RATES, CURVE = [0.1, 0.2, 0.3, 0.5], [0.1, 0.3, 0.6, 1.3]
SPEEDUP = lambda rates: ideal_speedup(SMOLLM2, 256, rates, 0.0)  # noqa: E731  (CPT's: from the shape alone)


def test_calibration_reaches_the_target_and_spares_sensitive_layers() -> None:
    sensitivity = [0.4, 0.1] + [0.03] * 27 + [0.08]
    rates = probe.calibrate(sensitivity, RATES, CURVE, 0.5, SPEEDUP, 1.15)
    assert ideal_speedup(SMOLLM2, 256, rates, 0.0) >= 1.15
    assert rates[0] == 0.0 and rates[1] < min(rates[2:29]) and max(rates) <= max(RATES)
    uniform = probe.uniform_rate_for(SPEEDUP, 1.15)
    assert abs(sum(rates) / len(rates) - uniform) < 0.01  # the same FLOPs, spread differently
    with pytest.raises(ValueError, match="beyond reach"):
        probe.calibrate(sensitivity, RATES, CURVE, 0.5, SPEEDUP, 3.0)


def test_curve_is_monotone_through_zero() -> None:
    g = probe._curve([0.1, 0.2, 0.5], [0.2, 0.1, 0.8])  # a noisy dip at 0.2
    assert g(0.0) == 0.0 and g(0.05) == pytest.approx(0.1)
    assert g(0.2) == pytest.approx(0.2) and g(0.35) == pytest.approx(0.5) and g(0.5) == pytest.approx(0.8)


def test_measure_on_a_tiny_model() -> None:
    model = build("llama-gqa")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 97, (2, 16), generator=g)), "labels": ids} for _ in range(2)]
    result = probe.measure(model, batches, ["random", "contrib"], [0.5, 0.9], MetricConfig(name="contrib", token_stride=2),
                           SelectorConfig(name="topk"), 0.9)
    with torch.no_grad():
        dense = sum(model(**b).loss.item() for b in batches) / 2
    assert result["dense_loss"] == pytest.approx(dense)
    assert set(result["loss"]) == {"random", "contrib"} and all(len(v) == 2 for v in result["loss"].values())
    assert all(x != pytest.approx(dense) for v in result["loss"].values() for x in v)  # sub-networks differ
    assert len(result["sensitivity"]) == 2
    assert "forward" not in vars(model.model.layers[0].mlp)  # every sparsifier was removed
    checked = probe.verify(model, batches, MetricConfig(name="contrib"), SelectorConfig(name="topk"), [0.0, 0.9], 0.45)
    assert set(checked) == {"calibrated_loss", "uniform_loss"}


def test_sensitivity_from_kept_layer_inputs_equals_full_forwards() -> None:
    from satrun.sat import Sparsifier

    model = build("qwen2")
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(0, 97, (2, 12), generator=g)), "labels": ids} for _ in range(2)]
    sat = Sparsifier(model, MetricConfig(name="contrib", token_stride=2), SelectorConfig(), seed=3)
    dense = probe._loss(model, batches)
    fast = probe._sensitivity(model, batches, sat, 0.5, 0.0, dense)
    slow = [probe._loss(model, batches, sat, [0.5 if j == layer else 0.0 for j in range(2)]) - dense for layer in range(2)]
    assert fast == pytest.approx(slow, abs=1e-5) and all(abs(x) > 1e-4 for x in fast)


def test_sft_sensitivity_on_packed_rows_with_the_token_split_equals_full_forwards() -> None:
    """The SFT probe: packed chats (their position ids replayed into every layer) and only the
    unlabelled tokens sparse; the kept-input shortcut equals full forwards."""
    from satrun.data.batches import collate
    from satrun.data.packing import pack_chats
    from satrun.labels import IGNORE
    from satrun.sat import Sparsifier

    model = build("llama-gqa")
    g = torch.Generator().manual_seed(2)
    chats = []
    for n, prompt in [(9, 5), (7, 4), (11, 6), (5, 3), (8, 5), (6, 2)]:
        ids = torch.randint(0, 97, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = IGNORE
        chats.append((ids, labels))
    rows = pack_chats(chats, 16)
    batches = [collate(rows[:2], 0), collate(rows[2:], 0)]
    assert all("position_ids" in b for b in batches)
    sat = Sparsifier(model, MetricConfig(name="contrib", token_stride=2), SelectorConfig(), seed=3, tokens="unlabelled")
    dense = probe._loss(model, batches)
    fast = probe._sensitivity(model, batches, sat, 0.5, 0.0, dense)
    slow = [probe._loss(model, batches, sat, [0.5 if j == layer else 0.0 for j in range(2)]) - dense for layer in range(2)]
    assert fast == pytest.approx(slow, abs=1e-5) and abs(fast[0]) > 1e-5
    # the last layer's unlabelled rows reach no loss (no later layer attends to them): free to omit
    assert abs(fast[1]) < 1e-5  # (up to rounding: the split computes the labelled rows in smaller products)
