"""End-to-end: ``satrun train`` in a subprocess on the tiny model, both modes, sweeps, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
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
    result = satrun("train", *TINY, "trainer.save_every=2", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_2"]
    assert (run / "checkpoints" / "step_2" / "model.safetensors").is_file()
    assert str(run) in result.stdout + result.stderr  # the run folder is announced
    summary = check_run_folder(run, steps=4)
    # packed CPT: no padding; every token but the first of a block is predicted
    assert summary["tokens"] == 4 * 4 * 63 and summary["padded_tokens"] == 4 * 4 * 64
    check_final_model(run / "final")
    assert not list(run.glob(".final.tmp-*"))


def test_sft_run_trains_on_chatterbot(satrun, tmp_path: Path) -> None:
    result = satrun("train", *TINY, "mode=sft", "data=chatterbot", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    summary = check_run_folder(tmp_path / "run", steps=4)
    assert summary["tokens"] < summary["padded_tokens"]  # prompts and padding carry no label
    check_final_model(tmp_path / "run" / "final")


def test_multirun_sweep_makes_one_folder_per_job(satrun, tmp_path: Path) -> None:
    result = satrun("train", "-m", *TINY, "trainer.max_steps=2", "optim.lr=1e-3,2e-3", "hydra.sweep.dir=sweep")
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


def test_loss_decreases_on_a_learnable_task(tmp_path: Path) -> None:
    """A repeated short text is learnable: the held-out loss must fall a lot in 60 steps."""
    from satrun.config import DataConfig, ModelConfig, OptimConfig, TrainerConfig
    from satrun.data import build_corpus
    from satrun.models import load_model, load_tokenizer
    from satrun.training.display import LogDisplay
    from satrun.training.trainer import train

    text = tmp_path / "abc.txt"
    text.write_text("\n\n".join("the quick brown fox jumps over the lazy dog " * 8 for _ in range(40)))
    model_cfg = ModelConfig(name="tiny", source="random")
    tokenizer = load_tokenizer(model_cfg)
    torch.manual_seed(0)
    model = load_model(model_cfg, tokenizer)
    corpus = build_corpus(DataConfig(name="text", format="text", path=str(text), eval_fraction=0.1), "cpt", tokenizer, 32, 4, 0)
    summary = train(model, corpus, TrainerConfig(max_steps=60, seq_len=32, log_every=10, device="cpu"),
                    OptimConfig(lr=5e-3, warmup_steps=3), tmp_path, LogDisplay())
    assert summary["eval_loss"] < 0.3 * summary["initial_eval_loss"]
