"""Logger backends: metrics.jsonl always, TensorBoard events, Weights & Biases offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import read_jsonl

FEW = ["model=tiny", "trainer.seq_len=64", "trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_every=0",
       "trainer.eval_batches=1", "scheduler=dense"]


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(satrun, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = satrun("train", *FEW, "logger=tensorboard", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"}
    assert losses.keys() == expected.keys() == {2, 4}
    assert all(losses[s] == pytest.approx(expected[s], rel=1e-6) for s in losses)
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [0, 4]


def test_wandb_logs_offline_into_the_run_folder(satrun, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    result = satrun("train", *FEW, "logger=wandb", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"train/loss" in data and b"eval/eval_loss" in data and b"micro_batch_size" in data  # records and config


def test_a_missing_backend_is_a_usage_error(satrun) -> None:
    result = satrun("train", *FEW, "logger=nonexistent")
    assert result.returncode == 2 and "logger" in result.stderr
