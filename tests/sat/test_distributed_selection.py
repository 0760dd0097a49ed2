"""Under data parallelism every rank keeps the same neurons, although each sees other tokens."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from satrun.sat.settings import MetricConfig, SelectorConfig
from satrun.sat.sparsifier import Sparsifier
from tests.gloo import on_two_ranks
from tests.sat.models import build

pytestmark = pytest.mark.slow  # two spawned ranks


def _kept(rank: int, metric: str) -> tuple[list[tuple[list[int], list[int], list[float]]], int]:
    """Each layer's kept channels and heads and its mean fill, and the collectives of the forward."""
    model = build("llama-mha")
    sparsifier = Sparsifier(model, MetricConfig(name=metric, token_stride=2), SelectorConfig(name="topk", fill="mean"),
                            seed=3)
    sparsifier.set_rates(0.5, 0.5, step=7)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(100 + rank))  # different data
    calls, real = [0], dist.all_reduce

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        logits = model(input_ids=ids).logits
    finally:
        dist.all_reduce = real
    logits.sum().backward()
    kept = [sparsifier.last_selection(layer) for layer in range(2)]
    return [(k["channels"].tolist(), k["heads"].tolist(), k["fill"].tolist()) for k in kept], calls[0]


METRICS = ["maxip", "contrib"]


def _rank(rank: int, join):  # type: ignore[no-untyped-def]
    alone = {metric: _kept(rank, metric) for metric in METRICS}  # before joining: each rank picks from its own tokens
    join()
    return {metric: (alone[metric], _kept(rank, metric)) for metric in METRICS}


@pytest.fixture(scope="module")
def selections() -> dict[int, dict]:
    """Each rank's selections, alone and joined, for every metric (one pair of processes)."""
    return on_two_ranks(_rank)


@pytest.mark.parametrize("metric", METRICS)
def test_ranks_select_the_same_heads_and_channels(selections, metric: str) -> None:
    ((alone_0, _), (together_0, calls_0)), ((alone_1, _), (together_1, calls_1)) = selections[0][metric], selections[1][metric]
    assert [k[:2] for k in alone_0] != [k[:2] for k in alone_1]  # the data differ enough to change the choice...
    for (*kept_0, fill_0), (*kept_1, fill_1) in zip(together_0, together_1):
        assert kept_0 == kept_1  # ...but with the scores reduced, both ranks keep the same neurons
        assert fill_0 == pytest.approx(fill_1, rel=1e-6, abs=1e-7)  # and add the same mean of all tokens
    # per layer: the heads' scores, and the channels' scores with the mean fill in one collective
    # where the metric's reduction is a sum (contrib), in two where it is a maximum (maxip)
    assert calls_0 == calls_1 == 2 * (1 + (2 if metric == "maxip" else 1))
    channels, heads, _ = together_0[0]
    assert len(channels) == 40 and len(heads) == 2  # half of 80 channels and of 4 heads
