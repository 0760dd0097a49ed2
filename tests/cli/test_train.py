"""End-to-end: ``satrun train`` in a subprocess on the tiny model, both modes, sweeps, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli.conftest import TINY, read_jsonl

TRAIN_FIELDS = {"kind", "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "padded_tokens"}
EVAL_FIELDS = {"kind", "step", "eval_loss", "eval_ppl"}
SUMMARY_FIELDS = {"steps", "tokens", "train_loss", "eval_loss", "eval_ppl", "tokens_per_s", "wall_s", "padded_tokens"}


def check_run_folder(run: Path, steps: int) -> dict:
    assert (run / ".hydra" / "config.yaml").is_file()
    records = read_jsonl(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert train and all(TRAIN_FIELDS <= set(r) for r in train)
    assert evals and all(EVAL_FIELDS <= set(r) for r in evals)
    assert [r["step"] for r in train] == sorted(r["step"] for r in train)
    assert train[-1]["step"] == steps and evals[0]["step"] == 0 and evals[-1]["step"] == steps
    assert all(r["tokens_per_s"] > 0 and r["tokens"] <= r["padded_tokens"] for r in train)
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["steps"] == steps and summary["tokens"] == train[-1]["tokens"]
    assert summary["eval_loss"] == evals[-1]["eval_loss"]
    return summary


def check_final_model(final: Path) -> None:
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    prompt = tokenizer("In the beginning", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5


def test_cpt_run_writes_complete_run_folder(satrun, tmp_path: Path) -> None:
    result = satrun("train", *TINY, "trainer.save_every=6", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_6"]
    assert (run / "checkpoints" / "step_6" / "model.safetensors").is_file()
    assert str(run) in result.stdout + result.stderr  # the run folder is announced
    summary = check_run_folder(run, steps=10)
    # packed CPT: no padding; every token but the first of a block is predicted
    assert summary["tokens"] == 10 * 4 * 63 and summary["padded_tokens"] == 10 * 4 * 64
    # the default runs SAT with the ladder schedule: every record says its stage and rates
    train = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert all({"stage", "mlp_rate", "attn_rate"} <= set(r) for r in train)
    assert train[0]["stage"] == "sparse" and train[0]["mlp_rate"] == 0.5 and train[-1]["stage"] == "dense"
    stages = summary["stages"]
    assert [s["name"] for s in stages] == ["sparse", "ladder-1", "ladder-2", "ladder-3", "ladder-4", "dense"]
    assert [s["steps"] for s in stages] == [5, 1, 1, 1, 1, 1]
    assert [s["mlp_rate"] for s in stages] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    assert all(s["tokens_per_s"] > 0 and 0 <= s["select_share"] < 1 for s in stages)
    check_final_model(run / "final")
    assert not list(run.glob(".final.tmp-*"))


def test_sft_run_trains_on_chatterbot(satrun, tmp_path: Path) -> None:
    result = satrun("train", *TINY, "mode=sft", "data=chatterbot", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    summary = check_run_folder(tmp_path / "run", steps=10)
    assert summary["tokens"] < summary["padded_tokens"]  # prompts and padding carry no label
    check_final_model(tmp_path / "run" / "final")


def test_multirun_sweep_makes_one_folder_per_job(satrun, tmp_path: Path) -> None:
    result = satrun("train", "-m", *TINY, "trainer.max_steps=2", "scheduler=constant", "optim.lr=1e-3,2e-3", "hydra.sweep.dir=sweep")
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        check_run_folder(job, steps=2)
        assert (job / "final" / "model.safetensors").is_file()
    lrs = [yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["optim"]["lr"] for job in jobs]
    assert lrs == [1e-3, 2e-3]


def test_cfg_job_prints_composed_config(satrun) -> None:
    result = satrun("train", "--cfg", "job", "mode=sft", "data=chatterbot")
    assert result.returncode == 0, result.stderr
    assert "name: sft" in result.stdout and "format: chatterbot" in result.stdout and "max_steps:" in result.stdout


def test_help_lists_groups_and_options(satrun) -> None:
    top = satrun("--help")
    assert top.returncode == 0
    for text in ("train", "model", "smollm2-135m", "tiny", "llama2-7b", "data", "chatterbot", "mode", "sft"):
        assert text in top.stdout
    sub = satrun("train", "--help")
    assert sub.returncode == 0
    assert "satrun train" in sub.stdout and "model: " in sub.stdout and "tinyllama-1.1b" in sub.stdout
