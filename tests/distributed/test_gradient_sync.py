"""Under gradient accumulation the ranks reduce gradients once per step, after the last
micro-batch: counted through DDP's communication hook and FSDP2's reduce, on two gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.gloo import on_two_ranks

pytestmark = pytest.mark.slow  # two spawned ranks


def _reductions(strategy: str, accum: int) -> int:
    """Gradient reductions of one training step of ``accum`` micro-batches."""
    from satrun.config import ModelConfig, OptimConfig
    from satrun.models import load_model, load_tokenizer
    from satrun.training import distributed
    from satrun.training.loss import CausalLMObjective
    from satrun.training.optim import build_optimizer
    from satrun.training.trainer import train_step

    tokenizer = load_tokenizer(ModelConfig(name="tiny", source="random"))
    torch.manual_seed(0)
    model = load_model(ModelConfig(name="tiny", source="random"), tokenizer)
    blocks = list(model.model.layers)
    objective = distributed.wrap(CausalLMObjective(model), blocks, strategy, distributed.current(), torch.device("cpu"))
    calls = [0]
    if strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counted(state, bucket):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return allreduce_hook(state, bucket)

        objective.register_comm_hook(None, counted)
    else:
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        real = _fsdp_param_group.foreach_reduce

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return real(*args, **kwargs)

        _fsdp_param_group.foreach_reduce = counted
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    from satrun.data.batches import collate

    batch = collate([(row, row.clone()) for row in ids], pad_id=0)
    optimizer = build_optimizer(model, OptimConfig())
    train_step(objective, optimizer, [batch] * accum, 1.0, torch.autocast("cpu", enabled=False))
    return calls[0]


STRATEGIES = ["ddp", "fsdp"]


def _rank(rank: int, join) -> dict[str, tuple[int, int]]:  # type: ignore[no-untyped-def]
    join()
    return {strategy: (_reductions(strategy, 1), _reductions(strategy, 3)) for strategy in STRATEGIES}


@pytest.fixture(scope="module")
def counts() -> dict[int, dict[str, tuple[int, int]]]:
    """Each rank's reductions for both strategies (one pair of processes)."""
    return on_two_ranks(_rank)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_accumulated_micro_batches_reduce_gradients_once(counts, strategy: str) -> None:
    for one, three in (rank[strategy] for rank in counts.values()):
        assert one > 0
        assert three == one  # not three times as many
