"""End-to-end: ``satrun train`` in a subprocess on the tiny model, both modes, sweeps, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli.conftest import TINY, read_jsonl, run_in_process

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


def test_cpt_run_writes_complete_run_folder(tmp_path: Path) -> None:
    from tests.cli.conftest import run_satrun

    # as a user runs it: its own interpreter (the other tests mostly call the CLI in-process)
    result = run_satrun(["train", *TINY, "trainer.save_every=6", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_10", "step_6"]  # the last step too
    assert (run / "checkpoints" / "step_6" / "model.safetensors").is_file()
    assert str(run) in result.stdout + result.stderr  # the run folder is announced
    assert "held-out blocks of 64 tokens" in result.stdout + result.stderr  # CPT counts packed blocks, not examples
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


def test_a_five_step_run_takes_the_ladder_rungs_that_fit(satrun, tmp_path: Path) -> None:
    """The natural smoke test: a ladder that does not fit uses the rungs that do, and says so.
    (Staging folders a killed earlier launch left behind are removed at the start.)"""
    stale = [tmp_path / "run" / ".final.tmp-abc", tmp_path / "run" / "checkpoints" / ".step_9.tmp-def"]
    for folder in stale:
        folder.mkdir(parents=True)
    result = satrun("train", *TINY, "trainer.max_steps=5", "hydra.run.dir=run")
    assert not any(folder.exists() for folder in stale)
    assert result.returncode == 0, result.stderr
    said = result.stdout + result.stderr
    assert "scheduler.ladder_steps=4: 3 rung(s) fit in trainer.max_steps=5" in said
    assert "optim.warmup_steps=10 is longer than the run" in said
    summary = check_run_folder(tmp_path / "run", steps=5)
    assert [s["name"] for s in summary["stages"]] == ["sparse", "ladder-1", "ladder-2", "ladder-3"]


def test_sft_run_trains_on_chatterbot(satrun, tmp_path: Path) -> None:
    result = satrun("train", *TINY, "mode=sft", "data=chatterbot", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    summary = check_run_folder(tmp_path / "run", steps=10)
    assert summary["tokens"] < summary["padded_tokens"]  # prompts and padding carry no label
    assert "packed into" in result.stdout + result.stderr and 0.0 <= summary["padding_share"] < 0.2
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert sum(r["flops"] for r in records) == pytest.approx(summary["train_flops"]) and summary["train_flops"] > 0
    assert records[-1]["train_flops"] == pytest.approx(summary["train_flops"])
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


def in_process(args: list[str], capsys: pytest.CaptureFixture, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """:func:`run_in_process` as (exit status, stdout, stderr)."""
    result = run_in_process(args, tmp_path, capsys)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("command, says", [("plan", "from the model's shape alone"), ("bench", "side by side"),
                                           ("probe", "sensitivity"), ("train", "continual pre-training"),
                                           ("generate", "chat template")])
def test_each_command_has_its_own_help(command: str, says: str, capsys, tmp_path: Path, monkeypatch) -> None:
    code, out, err = in_process([command, "--help"], capsys, tmp_path, monkeypatch)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith(f"satrun {command}:") and says in first
    assert f"satrun {command} " in out.split("Examples:")[1]  # its own examples


def test_report_help_and_version(capsys, tmp_path: Path, monkeypatch) -> None:
    code, out, _ = in_process(["report", "--help"], capsys, tmp_path, monkeypatch)
    assert code == 0 and out.startswith("usage: satrun report PATH")
    code, out, _ = in_process(["--version"], capsys, tmp_path, monkeypatch)
    from importlib.metadata import version as installed

    assert code == 0 and out.startswith(f"satrun {installed('satrun')} (torch ")


def test_train_help_lists_every_key_with_a_description(capsys, tmp_path: Path, monkeypatch) -> None:
    from satrun.cli.configs import keys
    from satrun.config import TrainConfig

    code, out, err = in_process(["train", "model=tiny", "--help"], capsys, tmp_path, monkeypatch)
    assert code == 0, err
    listed = {line.split("=", 1)[0].strip(): line for line in out.splitlines() if line.startswith("  ") and "=" in line}
    for key, description in keys(TrainConfig):
        assert description, f"{key} has no description (end its line in the dataclass with a comment)"
        assert key in listed and description[:30] in listed[key], key
    assert listed["model.source"].split()[0] == "model.source=random"  # values as composed


def test_every_key_is_settable_without_plus(capsys, tmp_path: Path, monkeypatch) -> None:
    """The dataclasses are Hydra's schema: keys a group's file does not name still exist."""
    code, out, err = in_process(["train", "data=jsonl", "data.path=x.jsonl", "data.eval_fraction=0.1",
                                 "data.max_examples=5", "data.skip_invalid=true", "model.source=pretrained",
                                 "model.path=/models/x", "model.tokenizer=t", "scheduler=constant", "--cfg", "job"],
                                capsys, tmp_path, monkeypatch)
    assert code == 0, err
    for text in ("eval_fraction: 0.1", "max_examples: 5", "skip_invalid: true", "path: /models/x", "tokenizer: t"):
        assert text in out
    code, _, err = in_process(["train", "trainer.max_steps=many", "--cfg", "job"], capsys, tmp_path, monkeypatch)
    assert code == 2 and "trainer.max_steps" in err


def test_sample_every_writes_generations_and_leaves_training_exactly_as_it_was(satrun, tmp_path: Path) -> None:
    plain = satrun("train", *TINY, "hydra.run.dir=plain")
    assert plain.returncode == 0, plain.stderr
    sampled = satrun("train", *TINY, "trainer.sample_every=4", "generate.max_new_tokens=4", "generate.temperature=0.8",
                     "generate.prompt=[Hello,The sea]", "hydra.run.dir=sampled")
    assert sampled.returncode == 0, sampled.stderr
    samples = read_jsonl(tmp_path / "sampled" / "samples.jsonl")
    assert [(s["step"], s["prompt"]) for s in samples] == [(step, p) for step in (4, 8, 10) for p in ("Hello", "The sea")]
    assert all(0 < s["new_tokens"] <= 4 and isinstance(s["output"], str) for s in samples)
    # generating (in eval mode, SAT layers dense, random state forked) changes nothing in training
    def numbers(run: str) -> list[dict]:  # every record but its timings
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                for r in read_jsonl(tmp_path / run / "metrics.jsonl")]

    assert numbers("sampled") == numbers("plain") and len(numbers("plain")) > 5
