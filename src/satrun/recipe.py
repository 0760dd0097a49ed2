"""One training run, end to end: model and data in, trained Hugging Face folder and summary out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from satrun.config import TrainConfig
from satrun.data import build_corpus
from satrun.errors import UsageError
from satrun.models import load_model, load_tokenizer, max_sequence_length
from satrun.sat import ScheduledSparsity, Sparsifier, UnsupportedModel, build_stages
from satrun.training import runtime
from satrun.training.display import make_display, print_summary
from satrun.training.metrics import write_summary
from satrun.training.saving import save_hf_folder
from satrun.training.trainer import train


def run_training(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train as configured, writing metrics.jsonl, summary.json and final/ into ``run_dir``."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    display = make_display(cfg.trainer.progress)
    display.message(f"run folder: {run_dir}")
    runtime.resolve_device(cfg.trainer.device)  # fail on a bad device before loading anything
    runtime.seed_everything(cfg.trainer.seed)

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer)
    limit = max_sequence_length(model)
    if limit is not None and cfg.trainer.seq_len > limit:
        raise UsageError(f"trainer.seq_len={cfg.trainer.seq_len} exceeds model={cfg.model.name}'s maximum of {limit} positions")
    corpus = build_corpus(
        cfg.data, cfg.mode.name, tokenizer, cfg.trainer.seq_len, cfg.trainer.micro_batch_size, cfg.trainer.seed
    )
    display.message(
        f"model {cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
        f"data {cfg.data.name} ({cfg.mode.name}): {len(corpus.train)} training and {len(corpus.eval)} held-out examples"
    )

    sparsity = _sparsity(cfg, model)
    display.message(_describe(cfg, sparsity))

    def save_model(folder: Path) -> Path:
        return save_hf_folder(model, tokenizer, folder)

    summary = train(model, corpus, cfg.trainer, cfg.optim, run_dir, display, save_model=save_model, hooks=[sparsity])
    overhead = sparsity.overhead_by_stage()
    for stage in summary["stages"]:
        stage["select_share"] = overhead.get(stage["name"], 0.0) / stage["total_s"] if stage["total_s"] else 0.0
    if sparsity.sparsifier is not None:
        sparsity.sparsifier.remove()
    final_dir = save_model(run_dir / "final")
    summary.update(final_dir=str(final_dir), run_dir=str(run_dir), wall_s=time.perf_counter() - started)
    write_summary(run_dir / "summary.json", summary)
    print_summary(summary)
    display.message(f"run folder: {run_dir}")
    return summary


def _sparsity(cfg: TrainConfig, model) -> ScheduledSparsity:  # type: ignore[no-untyped-def]
    """The schedule's hook; the model is only modified if some stage omits neurons."""
    stages = build_stages(cfg.scheduler, cfg.trainer.max_steps)
    if all(stage.dense for stage in stages):
        return ScheduledSparsity(stages, None)
    try:
        sparsifier = Sparsifier(model, cfg.metric, cfg.selector, cfg.scheduler.layers, seed=cfg.trainer.seed)
    except (UnsupportedModel, ValueError) as exc:
        raise UsageError(f"scheduler={cfg.scheduler.name}: {exc} (use scheduler=dense)") from exc
    return ScheduledSparsity(stages, sparsifier)


def _describe(cfg: TrainConfig, sparsity: ScheduledSparsity) -> str:
    if sparsity.sparsifier is None:
        return "SAT off: dense training (scheduler=dense)"
    plan = ", ".join(f"{s.name} {s.steps} steps @ {s.mlp_rate:.2f}/{s.attn_rate:.2f}" for s in sparsity.stages)
    return f"SAT: metric={cfg.metric.name} selector={cfg.selector.name}; stages (mlp/attn rate): {plan}"
