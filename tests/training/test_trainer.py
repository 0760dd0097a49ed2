"""The training loop on the tiny model: it learns, and it reports per-stage throughput."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from satrun.config import DataConfig, ModelConfig, OptimConfig, TrainerConfig
from satrun.data import build_corpus
from satrun.models import load_model, load_tokenizer
from satrun.training.display import LogDisplay
from satrun.training.run import RunIO, stage_summary
from satrun.training.trainer import StartState, StepHooks, train


def test_loss_decreases_on_a_learnable_task(tmp_path: Path) -> None:
    """A repeated short text is learnable: the held-out loss must fall a lot in 60 steps."""
    text = tmp_path / "abc.txt"
    text.write_text("\n\n".join("the quick brown fox jumps over the lazy dog " * 8 for _ in range(40)))
    model_cfg = ModelConfig(name="tiny", source="random")
    tokenizer = load_tokenizer(model_cfg)
    torch.manual_seed(0)
    model = load_model(model_cfg, tokenizer)
    corpus = build_corpus(DataConfig(name="text", format="text", path=str(text), eval_fraction=0.1), "cpt", tokenizer, 32, 4, 0)
    summary = train(model, corpus, TrainerConfig(max_steps=60, seq_len=32, log_every=10, device="cpu"),
                    OptimConfig(lr=5e-3, warmup_steps=3), RunIO(tmp_path, LogDisplay()))
    assert summary["eval_loss"] < 0.3 * summary["initial_eval_loss"]


def test_stage_summary_groups_steps_and_drops_warmup() -> None:
    log = [("sparse", 9.0, 100)] + [("sparse", 1.0, 100)] * 7 + [("dense", 2.0, 100)] * 3
    fields = {"sparse": {"stage": "sparse", "mlp_rate": 0.5, "attn_rate": 0.5}, "dense": {"stage": "dense", "mlp_rate": 0.0, "attn_rate": 0.0}}
    sparse, dense = stage_summary(log, fields)
    assert sparse["name"] == "sparse" and sparse["steps"] == 8 and sparse["mlp_rate"] == 0.5
    assert sparse["step_s"] == pytest.approx(1.0) and sparse["tokens_per_s"] == pytest.approx(100.0)  # 2 warm-up steps left out
    assert sparse["total_s"] == pytest.approx(9.0 + 7.0)
    assert dense["steps"] == 3 and dense["step_s"] == pytest.approx(2.0)  # too short for warm-up exclusion


def test_hook_fields_reach_records_and_stage_changes_split_records(tmp_path: Path) -> None:
    model_cfg = ModelConfig(name="tiny", source="random")
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, tokenizer)
    corpus = build_corpus(DataConfig(), "cpt", tokenizer, 32, 2, 0)
    hook = lambda step: {"stage": "a" if step < 3 else "b"}  # noqa: E731
    summary = train(model, corpus, TrainerConfig(max_steps=6, seq_len=32, micro_batch_size=2, log_every=4, eval_batches=1, device="cpu"),
                    OptimConfig(), RunIO(tmp_path, LogDisplay()), StepHooks([hook]))
    import json

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [(r["step"], r["stage"]) for r in records if r["kind"] == "train"]
    assert train_records == [(3, "a"), (4, "b"), (6, "b")]  # a record never spans two stages
    assert [(s["name"], s["steps"]) for s in summary["stages"]] == [("a", 3), ("b", 3)]


def test_the_last_step_is_checkpointed_and_a_resume_from_it_only_finishes(tmp_path: Path) -> None:
    """With save_every the last step is saved before the caller writes final/: a failed final
    write loses no training. Resuming from that checkpoint trains and evaluates nothing more,
    and the time of both launches adds up."""
    import json

    from transformers import AutoModelForCausalLM

    from satrun.training import checkpoint

    model_cfg = ModelConfig(name="tiny", source="random")
    tokenizer = load_tokenizer(model_cfg)
    corpus = build_corpus(DataConfig(), "cpt", tokenizer, 32, 2, 0)
    trainer = TrainerConfig(max_steps=6, seq_len=32, micro_batch_size=2, log_every=2, eval_every=3, eval_batches=1,
                            save_every=4, device="cpu")

    def save_model(folder: Path) -> None:
        model.save_pretrained(folder)

    model = load_model(model_cfg, tokenizer)
    first = train(model, corpus, trainer, OptimConfig(), RunIO(tmp_path, LogDisplay(), save_model=save_model))
    assert [p.name for p in checkpoint.checkpoints_in(tmp_path / "checkpoints")] == ["step_4", "step_6"]
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    last = tmp_path / "checkpoints" / "step_6"
    model = AutoModelForCausalLM.from_pretrained(last)
    again = train(model, corpus, trainer, OptimConfig(), RunIO(tmp_path, LogDisplay(), save_model=save_model),
                  start=StartState(resume=checkpoint.load_state(last)))
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == records  # no step, no evaluation repeated
    assert [json.loads(r)["step"] for r in records if json.loads(r)["kind"] == "eval"] == [0, 3, 6]
    assert again["eval_loss"] == first["eval_loss"] and again["steps"] == 6 and again["train_s"] == first["train_s"]
    assert again["wall_s"] > checkpoint.load_state(last)["run"]["wall_s"] > 0


def test_a_first_signal_is_noted_and_a_second_ctrl_c_stops_at_once() -> None:
    """The loop saves after the step in flight on the first Ctrl-C; a second one is a
    KeyboardInterrupt (the CLI's one line and status 130). Handlers are restored after."""
    import os
    import signal
    import time

    from satrun.training.trainer import _stop_requests

    before = signal.getsignal(signal.SIGINT)
    with _stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. a launcher's, after the group's Ctrl-C: changes nothing
        time.sleep(0.01)
        assert stop == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_failed_final_write_checkpoints_the_last_step_first(tmp_path: Path) -> None:
    """Without trainer.save_every nothing was saved during the run: a final/ that cannot be
    written leaves a checkpoint of the last step instead, so no training is lost."""
    from satrun.training import checkpoint

    model_cfg = ModelConfig(name="tiny", source="random")
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, tokenizer)
    corpus = build_corpus(DataConfig(), "cpt", tokenizer, 32, 2, 0)

    def save_model(folder: Path) -> None:
        model.save_pretrained(folder)
        if folder.name.startswith(".final"):
            raise OSError("the final write failed")

    with pytest.raises(OSError, match="the final write failed"):
        train(model, corpus, TrainerConfig(max_steps=3, seq_len=32, micro_batch_size=2, eval_batches=1, device="cpu"),
              OptimConfig(), RunIO(tmp_path, LogDisplay(), save_model=save_model))
    assert [p.name for p in checkpoint.checkpoints_in(tmp_path / "checkpoints")] == ["step_3"]
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob(".final*"))


def test_records_carry_the_model_flop_utilisation_given_a_peak(tmp_path: Path) -> None:
    from satrun.training.loggers import JsonLines

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"paragraph {i} with a few words in it" for i in range(80)))
    model_cfg = ModelConfig(name="tiny", source="random")
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, tokenizer)
    corpus = build_corpus(DataConfig(name="text", format="text", path=str(text)), "cpt", tokenizer, 16, 2, 0)
    records = []

    class Kept(JsonLines):
        def log(self, record):  # type: ignore[no-untyped-def]
            records.append(record)

    summary = train(model, corpus, TrainerConfig(max_steps=4, seq_len=16, micro_batch_size=2, log_every=2, device="cpu",
                                                 peak_flops=1e12),
                    OptimConfig(), RunIO(tmp_path, LogDisplay(), logger=Kept(tmp_path / "m.jsonl")),
                    StepHooks(flops=lambda b: 1e9 * len(b)))
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 2
    previous = 0
    for r in steps:
        seconds = (r["tokens"] - previous) / r["tokens_per_s"]
        previous = r["tokens"]
        assert r["mfu"] == pytest.approx(r["flops"] / seconds / 1e12)
    assert summary["mfu"] == pytest.approx(summary["train_flops"] / summary["train_s"] / 1e12)
    plain = train(load_model(model_cfg, tokenizer), corpus, TrainerConfig(max_steps=1, seq_len=16, micro_batch_size=2,
                                                                          device="cpu"), OptimConfig(), RunIO(tmp_path, LogDisplay()))
    assert "mfu" not in plain  # no known peak on CPU
