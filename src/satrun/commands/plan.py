"""``satrun plan``: FLOPs, ideal SAT speed-up and memory of a configuration, from shapes alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from satrun.config import TrainConfig, sparse_tokens
from satrun.data import build_corpus, eval_batches, token_counts
from satrun.errors import UsageError
from satrun.models import load_tokenizer
from satrun.perf.plan import build_plan, print_plan, shape_of, write_plan
from satrun.sat import ScheduleError, build_stages
from satrun.sparsity import adapted_shape


def run(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """FLOPs, ideal SAT speed-up and memory of the configured run, from the model's shape alone
    (in SFT also from the data: its share of labelled, unlabelled and padding tokens)."""
    t = cfg.trainer
    precision = "fp32" if t.precision in ("fp32", "tf32") else "bf16"  # auto: planned for CUDA, where it means bf16
    align = cfg.selector.align_on("cpu" if t.device == "cpu" else "cuda")  # likewise
    split = _token_split(cfg) if cfg.mode.name == "sft" else None
    try:
        plan = build_plan(adapted_shape(cfg, shape_of(cfg.model)), build_stages(cfg.scheduler, t.max_steps), t.seq_len, t.micro_batch_size,
                          precision, align, cfg.scheduler.layers, cfg.plan.ranks, t.strategy,
                          split, sparse_tokens(cfg), t.grad_accum, t.activation_checkpointing, cfg.scheduler.omit)
    except ScheduleError as exc:
        raise UsageError(str(exc)) from exc
    out = run_dir / "plan.json"
    write_plan(plan, out)
    print_plan(plan)
    print(f"plan written to {out}")
    return plan


def _token_split(cfg: TrainConfig) -> tuple[float, float, float]:
    """Shares of labelled, unlabelled and padding positions in the training data's micro-batches
    (in order; shuffled batches pad about as much)."""
    tokenizer = load_tokenizer(cfg.model)
    t = cfg.trainer
    corpus = build_corpus(cfg.data, cfg.mode.name, tokenizer, t.seq_len, t.micro_batch_size, t.seed, cfg.mode.train_on_inputs)
    counts = [0, 0, 0]
    for batch in eval_batches(corpus.train, t.micro_batch_size, corpus.pad_id, limit=0):
        counts = [a + b for a, b in zip(counts, token_counts(batch))]
    total = sum(counts)
    return counts[0] / total, counts[1] / total, counts[2] / total
