"""End-to-end: ``satrun probe`` writes its results and a scheduler file that ``satrun train`` takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import TINY


def test_probe_calibrates_and_train_accepts_the_scheduler_file(satrun, tmp_path: Path) -> None:
    result = satrun("probe", "model=tiny", "trainer.seq_len=64", "probe.metrics=[random,contrib]", "probe.rates=[0.3,0.6]",
                    "probe.batches=1", "probe.target_speedup=1.004", "metric=contrib", "hydra.run.dir=probe")
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert set(found["loss"]) == {"random", "contrib"} and len(found["sensitivity"]) == 2
    calibration = found["calibration"]
    assert calibration["ideal_speedup"] >= 1.004 and len(calibration["layer_rates"]) == 2
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 0
    assert "calibration=calibrated" in result.stdout
    conf = tmp_path / "probe" / "conf"
    train = satrun("train", *TINY, "calibration=calibrated", "metric=contrib", "hydra.run.dir=run", "--config-dir", str(conf))
    assert train.returncode == 0, train.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    sparse = summary["stages"][0]
    assert sparse["name"] == "sparse"
    assert sparse["mlp_rate"] == pytest.approx(sum(calibration["layer_rates"]) / 2)
    assert sparse["mlp_layer_rates"] == pytest.approx(calibration["layer_rates"])


def test_probe_rejects_an_unreachable_target(satrun) -> None:
    result = satrun("probe", "model=tiny", "trainer.seq_len=64", "probe.metrics=[random]", "probe.rates=[0.5]",
                    "probe.batches=1", "probe.target_speedup=2", "metric=random")
    assert result.returncode == 2 and "beyond reach" in result.stderr


def test_sft_probe_measures_answer_losses_with_the_token_split(satrun, tmp_path: Path) -> None:
    result = satrun("probe", "model=tiny", "mode=sft", "data=chatterbot", "trainer.seq_len=128", "probe.metrics=[contrib]",
                    "probe.rates=[0.3,0.9]", "probe.batches=1", "probe.target_speedup=1.0001", "metric=contrib",
                    "hydra.run.dir=probe")
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert found["mode"] == "sft" and found["sparse_tokens"] == "unlabelled"
    # only the unlabelled share omits neurons, and the head runs at labelled positions only
    assert 1.0 < found["ideal_speedups"][0] < found["ideal_speedups"][1]
    assert abs(found["sensitivity"][-1]) < 1e-5  # the last layer's unlabelled rows reach no loss (up to rounding)
    assert found["calibration"]["ideal_speedup"] >= 1.0001


def test_backward_omission_probe_compares_gradients(satrun, tmp_path: Path) -> None:
    result = satrun("probe", "model=tiny", "mode=sft", "data=chatterbot", "trainer.seq_len=128", "scheduler.omit=backward",
                    "probe.rates=[0.5,1.0]", "probe.layer_rate=1.0", "probe.batches=1", "hydra.run.dir=probe")
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert found["omit"] == "backward" and found["sparse_tokens"] == "unlabelled" and found["rates"] == [0.5, 1.0]
    assert 1.0 < found["ideal_speedups"][0] < found["ideal_speedups"][1]
    assert all(-1.0 <= c < 1.0 for c in found["gradient_cosine"])  # a sparse backward changes the gradient
    assert [len(layers) for layers in found["layer_gradient_cosine"]] == [2, 2]
    # the last layer's unlabelled rows reach no loss: their backward carries nothing to omit
    assert abs(found["sensitivity"][-1]) < 1e-6 < found["sensitivity"][0]
    refused = satrun("probe", "model=tiny", "scheduler.omit=backward", "probe.target_speedup=1.2")
    assert refused.returncode == 2 and "measures gradients only" in refused.stderr
