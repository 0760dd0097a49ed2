"""The training loop on the tiny model: it learns, and it reports per-stage throughput."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from satrun.config import DataConfig, ModelConfig, OptimConfig, TrainerConfig
from satrun.data import build_corpus
from satrun.models import load_model, load_tokenizer
from satrun.training.display import LogDisplay
from satrun.training.trainer import stage_summary, train


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
                    OptimConfig(lr=5e-3, warmup_steps=3), tmp_path, LogDisplay())
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
                    OptimConfig(), tmp_path, LogDisplay(), hooks=[hook])
    import json

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [(r["step"], r["stage"]) for r in records if r["kind"] == "train"]
    assert train_records == [(3, "a"), (4, "b"), (6, "b")]  # a record never spans two stages
    assert [(s["name"], s["steps"]) for s in summary["stages"]] == [("a", 3), ("b", 3)]
