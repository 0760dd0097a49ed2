"""Does satrun's training loop cost anything over a plain transformers loop?

Runs satrun's ``train`` and a hand-written loop (``model(input_ids, labels=labels).loss``,
``backward``, clip, AdamW step) on the same model weights and the same batches, alternating
between the two in one process, and reports the ratio of their tokens/s medians.

    python benchmarks/loop_overhead.py [--model smollm2-135m] [--steps 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from satrun.config import DataConfig, ModelConfig, OptimConfig, TrainerConfig
from satrun.data import BatchStream, build_corpus, label_tokens
from satrun.models import load_model, load_tokenizer
from satrun.training.display import LogDisplay
from satrun.training.optim import build_optimizer
from satrun.training.run import RunIO
from satrun.training.trainer import train


def plain_loop(model: torch.nn.Module, stream: BatchStream, steps: int, optim: OptimConfig) -> float:
    """tokens/s of the loop most users would write by hand."""
    model.train()
    optimizer = build_optimizer(model, optim)
    tokens, started = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(stream)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += label_tokens(batch)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model_cfg = ModelConfig(name=args.model, source="packaged" if args.model == "smollm2-135m" else "random")
    tokenizer = load_tokenizer(model_cfg)
    torch.manual_seed(0)
    base = load_model(model_cfg, tokenizer)
    corpus = build_corpus(DataConfig(), "cpt", tokenizer, args.seq_len, args.micro_batch, seed=0)
    optim = OptimConfig(warmup_steps=0)
    trainer_cfg = TrainerConfig(
        max_steps=args.steps, seq_len=args.seq_len, micro_batch_size=args.micro_batch, eval_batches=1,
        log_every=args.steps, device="cpu", seed=0,
    )

    satrun_tps, plain_tps = [], []
    for _ in range(args.repeats):
        plain_tps.append(plain_loop(copy.deepcopy(base), BatchStream(corpus.train, args.micro_batch, corpus.pad_id, 0), args.steps, optim))
        with tempfile.TemporaryDirectory() as run_dir:
            summary = train(copy.deepcopy(base), corpus, trainer_cfg, optim, RunIO(Path(run_dir), LogDisplay()))
        satrun_tps.append(summary["tokens_per_s"])
    result = {
        "model": args.model,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "plain_tokens_per_s": plain_tps,
        "satrun_tokens_per_s": satrun_tps,
        "ratio_of_medians": statistics.median(satrun_tps) / statistics.median(plain_tps),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
