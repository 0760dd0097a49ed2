"""The learning-rate schedule and the optimizer's weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from satrun.config import OptimConfig
from satrun.training.optim import build_optimizer, lr_at

LR, MIN_RATIO, WARMUP, MAX_STEPS = 1e-3, 0.1, 5, 40


def _cfg(schedule: str, **kw) -> OptimConfig:
    return OptimConfig(**{"lr": LR, "warmup_steps": WARMUP, "min_lr_ratio": MIN_RATIO, "schedule": schedule, **kw})


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_up_to_lr(schedule):
    cfg = _cfg(schedule)
    rates = [lr_at(s, cfg, MAX_STEPS) for s in range(WARMUP)]
    assert rates[0] > 0
    assert rates == pytest.approx([LR * (s + 1) / WARMUP for s in range(WARMUP)])
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert steps == pytest.approx([LR / WARMUP] * (WARMUP - 1))
    assert lr_at(WARMUP - 1, cfg, MAX_STEPS) == pytest.approx(LR)
    assert lr_at(WARMUP, cfg, MAX_STEPS) == pytest.approx(LR)  # decay starts from the peak


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_ends_at_min_lr_and_never_rises(schedule):
    cfg = _cfg(schedule)
    after = [lr_at(s, cfg, MAX_STEPS) for s in range(WARMUP - 1, MAX_STEPS + 10)]
    assert all(b <= a + 1e-15 for a, b in zip(after, after[1:])), "lr rises after warm-up"
    assert lr_at(MAX_STEPS - 1, cfg, MAX_STEPS) == pytest.approx(LR * MIN_RATIO)
    assert lr_at(MAX_STEPS - 2, cfg, MAX_STEPS) > LR * MIN_RATIO
    assert all(lr_at(s, cfg, MAX_STEPS) == pytest.approx(LR * MIN_RATIO) for s in range(MAX_STEPS, MAX_STEPS + 10))
    assert min(after) == pytest.approx(LR * MIN_RATIO)


def test_cosine_and_linear_shapes():
    span = MAX_STEPS - WARMUP - 1
    for k in range(span + 1):
        step, progress = WARMUP + k, k / span
        cos = LR * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))
        lin = LR * (MIN_RATIO + (1 - MIN_RATIO) * (1 - progress))
        assert lr_at(step, _cfg("cosine"), MAX_STEPS) == pytest.approx(cos)
        assert lr_at(step, _cfg("linear"), MAX_STEPS) == pytest.approx(lin)
    # Half way, both are at the mid point between lr and the final lr.
    mid = WARMUP + span // 2
    if span % 2 == 0:
        assert lr_at(mid, _cfg("cosine"), MAX_STEPS) == pytest.approx(LR * (1 + MIN_RATIO) / 2)
        assert lr_at(mid, _cfg("linear"), MAX_STEPS) == pytest.approx(LR * (1 + MIN_RATIO) / 2)


def test_min_lr_ratio_bounds():
    assert lr_at(MAX_STEPS - 1, _cfg("cosine", min_lr_ratio=0.0), MAX_STEPS) == pytest.approx(0.0, abs=1e-15)
    flat = _cfg("linear", min_lr_ratio=1.0)
    assert all(lr_at(s, flat, MAX_STEPS) == pytest.approx(LR) for s in range(WARMUP - 1, MAX_STEPS + 3))


def test_constant_stays_at_lr():
    cfg = _cfg("constant")
    assert all(lr_at(s, cfg, MAX_STEPS) == LR for s in range(WARMUP - 1, MAX_STEPS + 20))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_no_warmup_starts_at_lr(schedule):
    cfg = _cfg(schedule, warmup_steps=0)
    assert lr_at(0, cfg, MAX_STEPS) == pytest.approx(LR)
    end = LR if schedule == "constant" else LR * MIN_RATIO
    assert lr_at(MAX_STEPS - 1, cfg, MAX_STEPS) == pytest.approx(end)


def _transformers_factor(make):
    """The lr factor per step of a transformers schedule (its LambdaLR's lambda)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    return make(optimizer).lr_lambdas[0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_is_transformers_wsd_decay_but_warmup_is_not(schedule):
    """Why lr_at is satrun's own (docs/design.md): after warm-up it is transformers' WSD decay
    (no stable phase, decaying over the steps after the peak step), but no transformers schedule
    has satrun's warm-up (lr * (step + 1) / warmup, never 0) together with a min_lr_ratio floor."""
    from transformers.optimization import (
        get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup, get_wsd_schedule,
    )

    cfg = _cfg(schedule)
    wsd = _transformers_factor(lambda o: get_wsd_schedule(
        o, num_warmup_steps=WARMUP, num_decay_steps=MAX_STEPS - WARMUP - 1, num_stable_steps=0,
        decay_type=schedule, min_lr_ratio=MIN_RATIO))
    assert [lr_at(s, cfg, MAX_STEPS) for s in range(WARMUP, MAX_STEPS + 5)] == pytest.approx(
        [LR * wsd(s) for s in range(WARMUP, MAX_STEPS + 5)])
    assert LR * wsd(0) == pytest.approx(LR * MIN_RATIO)  # WSD warms up from the floor, not from lr / warmup
    hf = _transformers_factor(lambda o: get_cosine_schedule_with_warmup(o, WARMUP, MAX_STEPS) if schedule == "cosine"
                              else get_linear_schedule_with_warmup(o, WARMUP, MAX_STEPS))
    assert hf(0) == 0.0 and lr_at(0, cfg, MAX_STEPS) == pytest.approx(LR / WARMUP)  # HF's first step trains nothing
    assert hf(WARMUP - 1) < 1.0 and lr_at(WARMUP - 1, cfg, MAX_STEPS) == pytest.approx(LR)
    assert LR * hf(MAX_STEPS - 1) < LR * MIN_RATIO / 2  # no floor: min_lr_ratio would be ignored


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.scale = torch.nn.Parameter(torch.ones(()))  # 0-D: no decay either
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_build_optimizer_groups():
    model = _Tiny()
    cfg = OptimConfig(lr=2e-3, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0

    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == ids([model.embed.weight, model.proj.weight])
    assert ids(no_decay["params"]) == ids([model.proj.bias, model.norm.weight, model.norm.bias, model.scale])
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    frozen = ids(model.frozen.parameters())
    assert not frozen & (ids(decay["params"]) | ids(no_decay["params"]))
    for group in opt.param_groups:
        assert group["lr"] == 2e-3 and tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-6
        assert group["fused"]  # one fused kernel, on CPU too


def test_optimizer_step_decays_only_matrices():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only weight decay moves parameters
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.1 * 0.5))
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name], before[name]), name
