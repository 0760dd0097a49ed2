"""Omission-rate schedules: stages and rates at each step exactly as documented."""

from __future__ import annotations

import pytest

from satrun.sat.schedule import fitting_rungs, ScheduleError, build_stages, stage_at
from satrun.sat.settings import SchedulerConfig


def rates(cfg: SchedulerConfig, steps: int) -> list[tuple[str, float, float]]:
    stages = build_stages(cfg, steps)
    return [(stage_at(stages, s).name, stage_at(stages, s).mlp_rate, stage_at(stages, s).attn_rate) for s in range(steps)]


def test_dense_is_rate_zero_throughout() -> None:
    assert build_stages(SchedulerConfig(name="dense", rate=0.5), 10) == build_stages(SchedulerConfig(name="constant", rate=0.0), 10)
    assert set(rates(SchedulerConfig(name="dense"), 10)) == {("dense", 0.0, 0.0)}


def test_constant_uses_rate_and_attn_rate() -> None:
    assert set(rates(SchedulerConfig(name="constant", rate=0.3, attn_rate=0.6), 7)) == {("sparse", 0.3, 0.6)}
    assert set(rates(SchedulerConfig(name="constant", rate=0.3, attn_rate=None), 7)) == {("sparse", 0.3, 0.3)}


def test_ladder_steps_down_to_dense() -> None:
    cfg = SchedulerConfig(name="ladder", rate=0.5, attn_rate=None, sparse_fraction=0.5, ladder_steps=4, dense_fraction=0.1)
    got = rates(cfg, 100)
    expected = [("sparse", 0.5)] * 50 + [("ladder-1", 0.4)] * 10 + [("ladder-2", 0.3)] * 10 + \
               [("ladder-3", 0.2)] * 10 + [("ladder-4", 0.1)] * 10 + [("dense", 0.0)] * 10
    assert [(name, round(m, 10)) for name, m, _ in got] == [(n, round(r, 10)) for n, r in expected]
    assert all(a == pytest.approx(m) for _, m, a in got)


def test_ladder_stages_cover_the_run_without_gaps() -> None:
    cfg = SchedulerConfig(name="ladder", rate=0.6, sparse_fraction=0.4, ladder_steps=3, dense_fraction=0.15)
    for steps in (13, 57, 150):
        stages = build_stages(cfg, steps)
        assert stages[0].start == 0 and stages[-1].end == steps
        assert all(a.end == b.start for a, b in zip(stages, stages[1:]))
        assert [s.mlp_rate for s in stages] == sorted([s.mlp_rate for s in stages], reverse=True)
        assert stages[-1].dense


def test_ladder_without_rungs_goes_straight_to_dense() -> None:
    cfg = SchedulerConfig(name="ladder", rate=0.5, sparse_fraction=0.5, ladder_steps=0, dense_fraction=0.2)
    assert [(s.name, s.steps) for s in build_stages(cfg, 10)] == [("sparse", 5), ("dense", 5)]


@pytest.mark.parametrize(
    "cfg, steps, message",
    [
        (SchedulerConfig(name="constant", rate=1.0), 10, "scheduler.rate"),
        (SchedulerConfig(name="constant", rate=-0.1), 10, "scheduler.rate"),
        (SchedulerConfig(name="ladder", attn_rate=1.5), 10, "scheduler.attn_rate"),
        (SchedulerConfig(name="ladder", sparse_fraction=0.7, dense_fraction=0.5), 10, "exceeds the run"),
        (SchedulerConfig(name="wavy"), 10, "scheduler.name"),
    ],
)
def test_invalid_schedules_are_rejected(cfg: SchedulerConfig, steps: int, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        build_stages(cfg, steps)


def test_layer_scale_sets_each_layer_and_ladder_rungs_scale_them() -> None:
    cfg = SchedulerConfig(name="ladder", rate=0.2, attn_rate=0.0, sparse_fraction=0.5, ladder_steps=1, dense_fraction=0.25,
                          layer_scale=[0.0, 1.0, 2.0])
    stages = build_stages(cfg, 8)
    assert [s.name for s in stages] == ["sparse", "ladder-1", "dense"]
    assert stages[0].mlp_layer_rates == pytest.approx((0.0, 0.2, 0.4)) and stages[0].mlp_rate == pytest.approx(0.2)
    assert stages[1].mlp_layer_rates == pytest.approx((0.0, 0.1, 0.2)) and stages[1].mlp_rate == pytest.approx(0.1)
    assert stages[2].dense and stages[2].mlp_layer_rates is None
    assert stages[0].per_layer(3) == (list(stages[0].mlp_layer_rates), [0.0, 0.0, 0.0])
    with pytest.raises(ScheduleError, match="4 layers"):
        stages[0].per_layer(4)


def test_uniform_rate_per_layer_follows_layers() -> None:
    stage = build_stages(SchedulerConfig(name="constant", rate=0.5, attn_rate=0.25), 4)[0]
    assert stage.per_layer(3, [1]) == ([0.0, 0.5, 0.0], [0.0, 0.25, 0.0])


@pytest.mark.parametrize("bad", [dict(layer_scale=[]), dict(layer_scale=[1.0, 2.0]), dict(layer_scale=[1.0, -0.1]),
                                 dict(layer_scale=[1.0], layers=[0])])
def test_bad_layer_scales_are_rejected(bad: dict) -> None:
    with pytest.raises(ScheduleError, match="layer_scale"):
        build_stages(SchedulerConfig(name="constant", **bad), 4)


@pytest.mark.parametrize("max_steps", range(1, 12))
def test_a_short_run_takes_the_rungs_that_fit(max_steps: int) -> None:
    """The paper's ladder (4 rungs after half the run, 10% dense) in runs of 1 to 11 steps."""
    cfg = SchedulerConfig(name="ladder", rate=0.5, attn_rate=0.0, sparse_fraction=0.5, ladder_steps=4, dense_fraction=0.1)
    stages = build_stages(cfg, max_steps)
    assert stages[0].start == 0 and stages[-1].end == max_steps
    assert all(a.end == b.start and b.steps > 0 for a, b in zip(stages, stages[1:]))
    rungs = [s for s in stages if s.name.startswith("ladder-")]
    assert len(rungs) == fitting_rungs(cfg, max_steps) == min(4, max_steps - round(0.1 * max_steps) - round(0.5 * max_steps))
    rates = [s.mlp_rate for s in stages]
    assert rates == sorted(rates, reverse=True)  # the rate only falls
    if rungs:
        assert rungs[-1].mlp_rate == pytest.approx(0.5 / (len(rungs) + 1))
