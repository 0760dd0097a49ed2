"""End-to-end: ``satrun plan`` needs no weights and agrees with the FLOP model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_plan_llama2_7b_without_weights(satrun, tmp_path: Path) -> None:
    result = satrun("plan", "model=llama2-7b", "scheduler=constant", "scheduler.rate=0.5", "scheduler.attn_rate=null",
                    "trainer.seq_len=2048", "hydra.run.dir=plan")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["parameters"] == pytest.approx(6.74e9, rel=0.01)
    assert plan["stages"][0]["ideal_speedup"] == pytest.approx(1.96, rel=0.02)  # the method notes' table
    assert "ideal speed-up" in result.stdout


def test_plan_of_the_default_ladder_weights_stages_by_steps(satrun, tmp_path: Path) -> None:
    result = satrun("plan", "trainer.max_steps=100", "hydra.run.dir=plan")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    stages = plan["stages"]
    assert [s["name"] for s in stages] == ["sparse", "ladder-1", "ladder-2", "ladder-3", "ladder-4", "dense"]
    expected = 100 / sum(s["steps"] / s["ideal_speedup"] for s in stages)
    assert plan["run_ideal_speedup"] == pytest.approx(expected)
    assert 1.0 < plan["run_ideal_speedup"] < stages[0]["ideal_speedup"]
    mem = plan["memory_bytes"]
    assert mem["optimizer"] == 2 * mem["weights"] and mem["activations_first_stage"] < mem["activations_dense"]
