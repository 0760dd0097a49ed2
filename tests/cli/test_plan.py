"""End-to-end: ``satrun plan`` needs no weights and agrees with the FLOP model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def satrun(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``satrun plan`` needs no weights: run the CLI's main() in this process (seconds saved a call)."""
    from types import SimpleNamespace

    from tests.cli.test_train import in_process

    def call(*args: str) -> SimpleNamespace:
        code, out, err = in_process(list(args), capsys, tmp_path, monkeypatch)
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return call


def test_plan_llama2_7b_without_weights(satrun, tmp_path: Path) -> None:
    result = satrun("plan", "model=llama2-7b", "scheduler=constant", "scheduler.rate=0.5", "scheduler.attn_rate=null",
                    "trainer.seq_len=2048", "hydra.run.dir=plan")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["parameters"] == pytest.approx(6.74e9, rel=0.01)
    assert plan["stages"][0]["ideal_speedup"] == pytest.approx(1.96, rel=0.02)  # the method notes' table
    assert "ideal speed-up" in result.stdout


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_plan_counts_memory_per_rank(satrun, tmp_path: Path, strategy: str) -> None:
    """FSDP2 divides weights, gradients and AdamW state by the ranks and adds what it gathers."""
    result = satrun("plan", "model=llama2-13b", f"trainer.strategy={strategy}", "plan.ranks=8", "hydra.run.dir=plan")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    n, per_rank = plan["parameters"], plan["memory_per_rank_bytes"]
    shards = 8 if strategy == "fsdp" else 1
    assert (per_rank["weights"], per_rank["optimizer"]) == (4 * n / shards, 8 * n / shards)
    assert per_rank["host_start_up"] == 4 * n / shards
    gathered_layers = per_rank["gathered"] / 2 / (13.0e9 / 40)  # bf16, in units of one decoder layer
    assert (2 < gathered_layers < 10) if strategy == "fsdp" else per_rank["gathered"] == 0
    assert "memory per rank: 8 rank(s)" in result.stdout


def test_plan_of_the_default_ladder_weights_stages_by_steps(satrun, tmp_path: Path) -> None:
    result = satrun("plan", "trainer.max_steps=100", "~calibration", "hydra.run.dir=plan")  # the paper's ladder
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    stages = plan["stages"]
    assert [s["name"] for s in stages] == ["sparse", "ladder-1", "ladder-2", "ladder-3", "ladder-4", "dense"]
    expected = 100 / sum(s["steps"] / s["ideal_speedup"] for s in stages)
    assert plan["run_ideal_speedup"] == pytest.approx(expected)
    assert 1.0 < plan["run_ideal_speedup"] < stages[0]["ideal_speedup"]
    mem, first = plan["memory_per_rank_bytes"], plan["memory_per_rank_first_stage_bytes"]
    assert mem["optimizer"] == 2 * mem["weights"] and first["activations"] < mem["activations"]


def test_plan_counts_smollm2_once_and_follows_align_layers_and_layer_scale(satrun, tmp_path: Path) -> None:
    def plan(*overrides: str) -> dict:
        out = f"plan{len(list(tmp_path.iterdir()))}"
        result = satrun("plan", "scheduler=constant", "scheduler.rate=0.5", "~calibration", f"hydra.run.dir={out}", *overrides)
        assert result.returncode == 0, result.stderr
        return json.loads((tmp_path / out / "plan.json").read_text())

    base = plan()
    assert base["parameters"] == pytest.approx(134.5e6, rel=0.002)  # tied embedding counted once
    aligned = plan("selector.align=512")  # 768 kept channels of 1536 round to 1024 (2 x 512)
    assert aligned["stages"][0]["ideal_speedup"] < base["stages"][0]["ideal_speedup"]
    few = plan("scheduler.layers=[0,1,2]")
    assert 1.0 < few["stages"][0]["ideal_speedup"] < base["stages"][0]["ideal_speedup"]
    scale = [0.0] * 3 + [1.0] * 27
    per_layer = plan(f"scheduler.layer_scale=[{','.join(map(str, scale))}]")
    assert per_layer["stages"][0]["mlp_rate"] == pytest.approx(0.45)
    assert per_layer["stages"][0]["mlp_layer_rates"] == [0.5 * s for s in scale]
    assert few["stages"][0]["ideal_speedup"] < per_layer["stages"][0]["ideal_speedup"] < base["stages"][0]["ideal_speedup"]
    assert per_layer["run_flop_fraction"] == pytest.approx(1 / per_layer["run_ideal_speedup"])
    bad = satrun("plan", "scheduler.layer_scale=[1,1]", "hydra.run.dir=bad")
    assert bad.returncode == 2 and "30 layers" in bad.stderr


def test_plan_of_the_default_model_uses_its_calibration(satrun, tmp_path: Path) -> None:
    result = satrun("plan", "trainer.max_steps=150", "hydra.run.dir=plan")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    sparse, dense = plan["stages"]
    assert (sparse["name"], sparse["steps"], dense["name"], dense["steps"]) == ("sparse", 135, "dense", 15)
    assert plan["omit"] == "backward" and sparse["mlp_layer_rates"] == [0.5] * 30  # the exact-forward form
    assert plan["run_flop_fraction"] <= 0.84 and plan["run_ideal_speedup"] >= 1.2  # the study's run: 0.828
    paper = satrun("plan", "trainer.max_steps=150", "calibration=smollm2-135m_cpt_ladder_none_forward", "hydra.run.dir=paper")
    assert paper.returncode == 0, paper.stderr
    rates = json.loads((tmp_path / "paper" / "plan.json").read_text())["stages"][0]["mlp_layer_rates"]
    assert len(rates) == 30 and rates[0] == 0.0 and max(rates) == pytest.approx(0.5, abs=1e-5)


def test_sft_plan_measures_the_token_split_of_the_data(satrun, tmp_path: Path) -> None:
    result = satrun("plan", "model=tiny", "mode=sft", "data=chatterbot", "trainer.seq_len=128", "scheduler=constant",
                    "scheduler.rate=0.5", "scheduler.attn_rate=0", "hydra.run.dir=plan")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    split = plan["token_split"]
    assert sum(split.values()) == pytest.approx(1.0) and 0.1 < split["labelled"] < 0.6
    assert split["padding"] < 0.1  # packed rows
    assert plan["sparse_tokens"] == "unlabelled" and "token split (measured on the data)" in result.stdout
    # the stage's ideal: the FLOP model for that split, only the unlabelled share sparse, the head at labelled positions
    from satrun.perf.flops import Shape, step_flops

    shape, stage = Shape(**plan["shape"]), plan["stages"][0]
    split_counts = [split["labelled"], split["unlabelled"], split["padding"]]
    expected = step_flops(shape, 128, split_counts) / step_flops(shape, 128, split_counts, stage["mlp_layer_rates"], 0.0,
                                                                  tokens="unlabelled")
    assert stage["ideal_speedup"] == pytest.approx(expected) and expected > 1.0
    every = step_flops(shape, 128, split_counts) / step_flops(shape, 128, split_counts, stage["mlp_layer_rates"], 0.0)
    assert stage["ideal_speedup"] < every  # less than if every token were sparse
    flops = plan["train_flops"]
    assert flops["sat"] == pytest.approx(flops["dense"] * plan["run_flop_fraction"])


def test_plan_warns_where_per_weight_work_dominates_a_gpu_step(satrun, tmp_path: Path) -> None:
    """At 1,024 tokens per micro-batch half of a 7B GPU step is per-weight work SAT does not
    shrink; at 8,192 it is a ninth, and the plan says nothing."""
    short = satrun("plan", "model=llama2-7b", "hydra.run.dir=short")
    long = satrun("plan", "model=llama2-7b", "trainer.seq_len=2048", "hydra.run.dir=long")
    assert short.returncode == 0 and long.returncode == 0, short.stderr + long.stderr
    assert "work per weight" in " ".join(short.stdout.split()) and "work per weight" not in " ".join(long.stdout.split())
    shares = [json.loads((tmp_path / d / "plan.json").read_text())["per_weight_share"] for d in ("short", "long")]
    assert 0.4 < shares[0] < 0.6 and shares[1] < 0.15


def test_plan_counts_lora_memory_and_flops(satrun, tmp_path: Path) -> None:
    """adapter=lora: gradients and AdamW state for the adapters only; fewer training FLOPs."""
    full = satrun("plan", "model=llama2-7b", "scheduler=dense", "hydra.run.dir=full")
    lora = satrun("plan", "model=llama2-7b", "scheduler=dense", "adapter=lora", "hydra.run.dir=lora")
    assert full.returncode == 0 and lora.returncode == 0, lora.stderr
    f, l = (json.loads((tmp_path / d / "plan.json").read_text()) for d in ("full", "lora"))
    adapters, mem = l["adapter_parameters"], l["memory_per_rank_bytes"]
    assert 39e6 < adapters < 41e6  # r=16 on every projection of Llama-2-7B
    assert (mem["gradients"], mem["optimizer"]) == (4 * adapters, 8 * adapters)
    assert mem["peak"] < 80 * 2**30 < f["memory_per_rank_bytes"]["peak"]  # fits one 80 GB GPU; full fine-tuning does not
    assert 0.6 < l["dense_flops_per_token"]["train"] / f["dense_flops_per_token"]["train"] < 0.75
    assert "LoRA rank 16" in " ".join(lora.stdout.split())
    # a frozen base has no AdamW, gradient or clipping work: per-weight work is a small share at 1,024 tokens
    assert l["per_weight_share"] < 0.4 * f["per_weight_share"] and "work per weight" not in " ".join(lora.stdout.split())


def test_sft_plan_of_the_backward_omission(satrun, tmp_path: Path) -> None:
    """scheduler.omit=backward: the stage costs what step_flops says for it, less than dense and
    more than the forward form at the same rate; rate 1 is planned."""
    result = satrun("plan", "model=tiny", "mode=sft", "data=chatterbot", "trainer.seq_len=128", "scheduler=constant",
                    "scheduler.rate=1.0", "scheduler.attn_rate=0", "scheduler.omit=backward", "hydra.run.dir=plan")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["omit"] == "backward" and "every forward dense" in result.stdout
    from satrun.perf.flops import Shape, step_flops

    shape, stage, split = Shape(**plan["shape"]), plan["stages"][0], plan["token_split"]
    counts = [split["labelled"], split["unlabelled"], split["padding"]]
    expected = step_flops(shape, 128, counts) / step_flops(shape, 128, counts, stage["mlp_layer_rates"], 0.0,
                                                           tokens="unlabelled", omit="backward")
    assert stage["ideal_speedup"] == pytest.approx(expected) and expected > 1.0
