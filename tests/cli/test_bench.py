"""End-to-end: ``satrun bench`` times plain, dense and SAT steps and writes bench.json."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

FIELDS = {"name", "rate", "tokens_per_step", "tokens_per_s", "speedup", "speedup_quartiles", "ideal_speedup", "efficiency", "overhead_share", "peak_mem_bytes", "mfu"}


def test_bench_rows(satrun, tmp_path: Path) -> None:
    result = satrun("bench", "model=tiny", "trainer.seq_len=64", "bench.steps=1", "bench.repeats=3",
                    "bench.rates=[0.01,0.5]", "bench.backward_rates=[]", "hydra.run.dir=bench")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [r["name"] for r in rows] == ["plain", "dense", "rate 0.01", "rate 0.5"]
    assert all(FIELDS <= set(r) for r in rows)
    dense, barely, sparse = rows[1], rows[2], rows[3]
    # an ideal gain within 2% of none: (measured - 1) / (ideal - 1) would be noise over noise
    assert barely["ideal_speedup"] < 1.02 and barely["efficiency"] is None
    assert [line.split("│")[6].strip() for line in result.stdout.splitlines() if "rate 0.01" in line] == ["-"]
    assert dense["speedup"] == pytest.approx(1.0) and dense["overhead_share"] == 0.0
    assert sparse["rate"] == 0.5 and sparse["ideal_speedup"] > 1.0 and 0.0 < sparse["overhead_share"] < 1.0
    assert all(r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"]) for r in rows)
    assert 0 < rows[0]["tokens_per_step"] <= 64 * 4 and "labelled tokens per step" in result.stdout
    paired = [d / t for d, t in zip(dense["step_s_samples"], sparse["step_s_samples"])]  # round by round
    assert len(paired) == 3 and sparse["speedup"] == pytest.approx(statistics.median(paired))
    low, _, high = sorted(paired)  # inclusive quartiles of three values: midpoints towards the median
    assert sparse["speedup_quartiles"] == pytest.approx([(low + statistics.median(paired)) / 2,
                                                         (high + statistics.median(paired)) / 2])
    assert all(r["mfu"] is None and r["profile_s"] is None for r in rows)  # no known peak on CPU; not profiled
    assert 0 < sparse["peak_mem_bytes"] < dense["peak_mem_bytes"]  # counted tensor bytes on CPU
    assert (tmp_path / "bench" / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_sft_bench_times_the_padded_step_beside_the_packed_and_token_aware_ones(satrun, tmp_path: Path) -> None:
    result = satrun("bench", "model=tiny", "mode=sft", "data=chatterbot", "trainer.seq_len=128", "bench.steps=1",
                    "bench.repeats=2", "bench.rates=[0.5]", "bench.backward_rates=[0.5,1.0]", "hydra.run.dir=bench")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench" / "bench.json").read_text())}
    # no plain row: it would cross chats
    assert list(rows) == ["dense, padded, full head", "dense", "rate 0.5", "backward 0.5", "backward 1"]
    # a backward-only omission saves less than the sub-network at the same rate; rate 1 saves the most
    half, whole = rows["backward 0.5"], rows["backward 1"]
    assert half["omit"] == whole["omit"] == "backward" and rows["rate 0.5"]["omit"] == "forward"
    assert 1.0 < half["ideal_speedup"] < rows["rate 0.5"]["ideal_speedup"] and half["ideal_speedup"] < whole["ideal_speedup"]
    assert half["overhead_share"] > 0.0 and whole["overhead_share"] == 0.0  # rate 1 scores and chooses nothing
    padded, dense, sparse = rows["dense, padded, full head"], rows["dense"], rows["rate 0.5"]
    # packed rows of 128 tokens hold several chats: more labelled tokens per step than 4 padded chats
    assert dense["tokens_per_step"] > padded["tokens_per_step"] > 0
    # the padded step runs the head everywhere and pads: more FLOPs per labelled token
    assert padded["ideal_speedup"] < 1.0 and dense["ideal_speedup"] == 1.0 < sparse["ideal_speedup"]
    assert 0.0 < sparse["overhead_share"] < 1.0 and padded["overhead_share"] == 0.0
    assert len(padded["step_s_samples"]) == 2 and padded["speedup"] > 0 and "dense, padded, full head" in result.stdout


def test_bench_rejects_rates_outside_zero_one(satrun) -> None:
    result = satrun("bench", "model=tiny", "bench.rates=[1.2]")
    assert result.returncode == 2 and "bench.rates" in result.stderr
    result = satrun("bench", "model=tiny", "bench.backward_rates=[0]")
    assert result.returncode == 2 and "bench.backward_rates in (0, 1]" in result.stderr


def test_gpu_bench_script_runs_its_path_on_cpu(tmp_path: Path) -> None:
    """scripts/gpu_bench.sh with DEVICE=cpu on a shrunk Llama-2-7B-shaped model, bf16 autocast."""
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DEVICE="cpu", LAYERS="1", RATES="[0.5]", OUT=str(tmp_path / "gpu"),
               SATRUN=str(Path(sys.executable).parent / "satrun"), TOKENIZERS_PARALLELISM="false")
    shrink = ["model.hidden_size=128", "model.intermediate_size=256", "model.num_heads=4", "model.num_kv_heads=4",
              "trainer.seq_len=64", "trainer.micro_batch_size=2", "bench.steps=1", "bench.repeats=1"]
    result = subprocess.run(["bash", str(repo / "scripts" / "gpu_bench.sh"), *shrink], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu" / "bench.json").read_text())
    assert [r["name"] for r in rows] == ["plain", "dense", "rate 0.5", "backward 0.5", "backward 1"]
    config = (tmp_path / "gpu" / ".hydra" / "config.yaml").read_text()
    assert "precision: bf16" in config and "num_layers: 1" in config


def test_bench_profile_splits_a_step_into_matrix_products_attention_and_the_rest(satrun, tmp_path: Path) -> None:
    result = satrun("bench", "model=tiny", "trainer.seq_len=64", "bench.steps=1", "bench.repeats=1",
                    "bench.rates=[0.5]", "bench.backward_rates=[]", "bench.profile=true", "hydra.run.dir=bench")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())
    for row in rows:
        p = row["profile_s"]
        assert p["matmul"] > 0 and p["attention"] > 0 and p["other"] > 0
        # operators' own times on the calling thread: together within the profiled step's wall time
        assert 0.3 * p["wall"] < p["matmul"] + p["attention"] + p["other"] <= 1.05 * p["wall"]
    assert "where a step's time goes" in result.stdout


def test_bench_with_adapters_leaves_the_backward_omission_out(satrun, tmp_path: Path) -> None:
    result = satrun("bench", "model=tiny", "adapter=lora", "trainer.seq_len=64", "bench.steps=1", "bench.repeats=1",
                    "bench.rates=[0.5]", "hydra.run.dir=bench")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [r["name"] for r in rows] == ["plain", "dense", "rate 0.5"]
    refused = satrun("bench", "model=tiny", "adapter=lora", "bench.backward_rates=[0.9]")
    assert refused.returncode == 2 and "does not take adapters yet" in refused.stderr
