"""The training loop. Read it top to bottom: it is the whole of what happens each step.

The loop only sees a ``torch.nn.Module`` that maps token ids to logits; whether that module
computes densely or sparsely is not its business. Hooks may add fields to each train record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from satrun.config import TrainerConfig, OptimConfig
from satrun.data import BatchStream, Corpus, eval_batches, label_tokens
from satrun.data.sft import IGNORE
from satrun.errors import UsageError
from satrun.training import runtime
from satrun.training.display import Display
from satrun.training.metrics import MetricsFile, perplexity
from satrun.training.optim import build_optimizer, lr_at

Batch = dict[str, torch.Tensor]
StepHook = Callable[[int], dict[str, Any]]  # called before each optimizer step; returns record fields


def causal_lm_loss(model: torch.nn.Module, batch: Batch, normalizer: int) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled tokens, divided by ``normalizer``.

    Dividing every micro-batch by the step's total label count makes gradient accumulation
    weigh each token equally, however the tokens fall into micro-batches.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]  # shift labels, not logits: no copy
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss / normalizer


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    grad_clip: float,
    amp: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the micro-batches, clip, step. Returns (mean loss, grad norm) as tensors."""
    n_tokens = max(1, sum(label_tokens(b) for b in micro_batches))
    total = torch.zeros((), device=micro_batches[0]["input_ids"].device)
    for batch in micro_batches:
        with amp:
            loss = causal_lm_loss(model, batch, n_tokens)
        loss.backward()
        total += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[Batch], amp: Any) -> float:
    """Mean next-token loss over all labelled held-out tokens."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = label_tokens(batch)
        with amp:
            total += float(causal_lm_loss(model, batch, 1))
        count += n
    model.train()
    return total / max(1, count)


@dataclass
class RunState:
    """Everything that advances during training (what a resume would restore)."""

    step: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    train_s: float = 0.0
    train_loss: float = float("nan")
    eval_history: list[dict[str, Any]] = field(default_factory=list)


def train(
    model: torch.nn.Module,
    corpus: Corpus,
    trainer: TrainerConfig,
    optim: OptimConfig,
    run_dir: Path,
    display: Display,
    save_model: Optional[Callable[[Path], Any]] = None,
    hooks: Sequence[StepHook] = (),
) -> dict[str, Any]:
    """Train ``model`` on ``corpus``; returns the run summary.

    ``save_model(folder)`` writes the model; it is called every ``trainer.save_every`` steps
    with ``run_dir/checkpoints/step_N`` (the final model is the caller's to save).
    """
    device = runtime.resolve_device(trainer.device)
    amp = runtime.autocast(device, runtime.resolve_precision(trainer.precision, device))
    model.to(device).train()
    if trainer.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(model, optim)
    stream = BatchStream(corpus.train, trainer.micro_batch_size, corpus.pad_id, trainer.seed)
    held_out = [_to(b, device) for b in eval_batches(corpus.eval, trainer.micro_batch_size, corpus.pad_id, trainer.eval_batches)]
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    state = RunState()

    def run_eval() -> None:
        loss = evaluate(model, held_out, amp)
        record = {"kind": "eval", "step": state.step, "eval_loss": loss, "eval_ppl": perplexity(loss)}
        metrics.write(record)
        display.eval(record)
        state.eval_history.append(record)

    interval_loss = torch.zeros((), device=device)
    interval_steps, interval_tokens, interval_s = 0, 0, 0.0
    try:
        run_eval()
        display.start(trainer.max_steps, state.step)
        while state.step < trainer.max_steps:
            extra: dict[str, Any] = {}
            for hook in hooks:
                extra.update(hook(state.step))
            lr = lr_at(state.step, optim, trainer.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            micro_batches = [_to(next(stream), device) for _ in range(trainer.grad_accum)]
            tokens = sum(label_tokens(b) for b in micro_batches)
            loss, grad_norm = train_step(model, optimizer, micro_batches, optim.grad_clip, amp)
            interval_loss += loss
            state.step += 1
            interval_steps += 1
            interval_tokens += tokens
            state.tokens += tokens
            state.padded_tokens += sum(b["input_ids"].numel() for b in micro_batches)

            if state.step % trainer.log_every == 0 or state.step == trainer.max_steps:
                runtime.synchronize(device)  # .item() below waits anyway; make the timing include it
                interval_s += time.perf_counter() - started
                state.train_s += interval_s
                state.train_loss = float(interval_loss) / interval_steps
                record = {
                    "kind": "train",
                    "step": state.step,
                    "loss": state.train_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens": state.tokens,
                    "padded_tokens": state.padded_tokens,
                    "tokens_per_s": interval_tokens / interval_s,
                    "elapsed_s": state.train_s,
                    **extra,
                }
                metrics.write(record)
                display.train(record)
                interval_loss.zero_()
                interval_steps, interval_tokens, interval_s = 0, 0, 0.0
            else:
                interval_s += time.perf_counter() - started

            if trainer.eval_every and state.step % trainer.eval_every == 0 and state.step < trainer.max_steps:
                run_eval()
            if save_model and trainer.save_every and state.step % trainer.save_every == 0 and state.step < trainer.max_steps:
                save_model(run_dir / "checkpoints" / f"step_{state.step}")
        run_eval()
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if not runtime.is_out_of_memory(exc):
            raise
        raise UsageError(
            f"trainer.micro_batch_size={trainer.micro_batch_size} at trainer.seq_len={trainer.seq_len} does not fit "
            f"in memory (step {state.step}); lower trainer.micro_batch_size and raise trainer.grad_accum"
        ) from None
    finally:
        display.close()
        metrics.close()

    return {
        "steps": state.step,
        "tokens": state.tokens,
        "padded_tokens": state.padded_tokens,
        "train_loss": state.train_loss,
        "initial_eval_loss": state.eval_history[0]["eval_loss"],
        "eval_loss": state.eval_history[-1]["eval_loss"],
        "eval_ppl": state.eval_history[-1]["eval_ppl"],
        "tokens_per_s": state.tokens / state.train_s if state.train_s else 0.0,
        "train_s": state.train_s,
        "peak_mem_bytes": runtime.peak_memory_bytes(device),
        "device": str(device),
    }


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

