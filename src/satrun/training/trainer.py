"""The training loop. Read it top to bottom: it is the whole of what happens each step.

The loop only sees a ``torch.nn.Module`` that maps token ids to logits; whether that module
computes densely or sparsely is not its business. Hooks may add fields to each train record.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from satrun.config import TrainerConfig, OptimConfig
from satrun.data import BatchStream, Corpus, eval_batches, label_tokens
from satrun.errors import OutOfMemory
from satrun.training import distributed, runtime
from satrun.training.loggers import JsonLines
from satrun.training.loss import CausalLMObjective
from satrun.training.optim import build_optimizer, lr_at
from satrun.training.run import Batch, EveryNSteps, Run, RunIO, StageFields, StepHook

BatchHook = Callable[[Batch], None]  # called with each micro-batch before its forward
StepFlops = Callable[[Sequence[Batch]], float]  # training FLOPs of a step's micro-batches (host batches)


def train_step(
    objective: Callable[[Batch, float], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    grad_clip: float,
    amp: Any,
    flops: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Forward/backward over the micro-batches, clip, step. Returns the mean loss and the grad
    norm (tensors), the step's label tokens on all ranks and ``flops`` (this rank's training
    FLOPs) summed over the ranks, both in the step's one collective over counts.

    The loss is normalised by the label tokens of the whole step on all ranks, and scaled by the
    number of ranks, which DDP and FSDP divide the summed gradients by. A non-finite loss or
    gradient norm skips the optimizer update; the caller sees it in the returned values.
    """
    device = micro_batches[0]["input_ids"].device
    ranks = distributed.current().size
    labelled, flops = distributed.totals([sum(label_tokens(b) for b in micro_batches), flops], device)
    n_tokens = max(1.0, labelled)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        with distributed.gradient_sync(objective, enabled=i == len(micro_batches) - 1):
            with amp:
                loss = objective(batch, n_tokens / ranks)
            loss.backward()
        total += loss.detach()
    if ranks > 1:
        torch.distributed.all_reduce(total)
        total /= ranks
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    step_unless_non_finite(optimizer, torch.isfinite(total) & torch.isfinite(grad_norm))
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm, round(labelled), flops


def step_unless_non_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``finite`` (a device bool) is false. A fused optimizer takes
    the flag itself, as it takes GradScaler's (``found_inf``: the kernel leaves parameters,
    moments and step counts as they were), so the host never waits for the device here; any
    other optimizer reads the flag on the host first (one sync)."""
    if optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(finite):
        optimizer.step()


@dataclass
class StepHooks:
    """What a training method adds to the steps without the loop knowing it: each of ``step``
    is called before every step with the step number and returns fields for the train records
    (a ``stage`` field groups the steps for the per-stage report); each of ``batch`` sees every
    micro-batch before its forward; ``flops(host_batches)`` says a step's training FLOPs on
    this rank (records and the summary carry them); ``stage(name, seconds)`` gives the method's
    own fields of a stage in the summary."""

    step: Sequence[StepHook] = ()
    batch: Sequence[BatchHook] = ()
    flops: Optional[StepFlops] = None
    stage: Optional[StageFields] = None


@dataclass
class StartState:
    """Where the weights and the loop's state come from. ``resume``: a checkpoint's training
    state (:func:`checkpoint.load_state`; the caller has loaded unsharded weights), from which
    the run continues exactly. ``fill(model)``: called once the model is wrapped for its
    strategy, it gives the parameters their values where the caller built them empty (on the
    meta device, for an FSDP2 start in which each rank fills only its shards)."""

    resume: Optional[dict[str, Any]] = None
    fill: Optional[Callable[[torch.nn.Module], None]] = None


def train(model: torch.nn.Module, corpus: Corpus, trainer: TrainerConfig, optim: OptimConfig, io: RunIO,
          hooks: StepHooks = StepHooks(), callbacks: Sequence[EveryNSteps] = (), start: StartState = StartState(),
          ) -> dict[str, Any]:
    """Train ``model`` on ``corpus``; returns the run summary.

    The held-out loss is evaluated at the start, every ``trainer.eval_every`` steps and at the
    end; every ``trainer.save_every`` steps, and when SIGINT or SIGTERM arrives, a checkpoint
    goes to ``run_dir/checkpoints/step_N``; ``callbacks`` add their own periodic work. With
    ``trainer.save_every`` the last step is checkpointed too, before ``final/``; without it, a
    failed final write in a one-process run checkpoints the last step then, so it loses no
    training either.
    """
    world = distributed.current()
    device = distributed.device_of(world, runtime.resolve_device(trainer.device))
    dtype = runtime.resolve_precision(trainer.precision, device)
    objective = _prepare(model, trainer, world, device, dtype, start.fill, hooks.batch)
    optimizer = build_optimizer(model, optim)
    stream = BatchStream(corpus.train, trainer.micro_batch_size, corpus.pad_id, trainer.seed, world.rank, world.size,
                         pin_memory=device.type == "cuda")  # pinned: the non_blocking copies in _to are asynchronous
    held_out = [_to(b, device) for b in eval_batches(corpus.eval, trainer.micro_batch_size, corpus.pad_id, trainer.eval_batches)]
    resume = start.resume
    logger = io.logger or JsonLines(io.run_dir / "metrics.jsonl", keep_through=resume["run"]["step"] if resume else None)
    run = Run(trainer, io, logger, model, objective, optimizer, stream, held_out, runtime.autocast(device, dtype), device,
              world.size, peak_flops=trainer.peak_flops or runtime.peak_flops(device, dtype))
    periodic = [EveryNSteps(trainer.eval_every, lambda step: run.evaluate(), at_start=True, at_end=False),  # the end's: finish
                *callbacks,
                EveryNSteps(1, lambda step: run.stop_if_asked(), at_end=False),
                EveryNSteps(trainer.save_every, lambda step: run.checkpoint(), at_end=False)]
    if resume is not None:
        run.restore(resume)
    state = run.state
    try:
        with _stop_requests() as run.stop_requests:
            if resume is None:
                for work in periodic:
                    if work.at_start:
                        run.perform(work)
            io.display.start(trainer.max_steps, state.step)
            while state.step < trainer.max_steps:
                fields = run.begin_step(hooks.step)
                lr = lr_at(state.step, optim, trainer.max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                started = time.perf_counter()
                host_batches = [next(stream) for _ in range(trainer.grad_accum)]
                micro_batches = [_to(b, device) for b in host_batches]
                loss, grad_norm, tokens, step_flops = train_step(objective, optimizer, micro_batches, optim.grad_clip,
                                                                 run.amp, hooks.flops(host_batches) if hooks.flops else 0.0)
                runtime.synchronize(device)  # honest per-step time (no host sync happens otherwise)
                run.end_step(loss, grad_norm, tokens, step_flops, time.perf_counter() - started, lr, host_batches, fields)

                last = state.step == trainer.max_steps
                if run.interval.steps and (state.step % trainer.log_every == 0 or last):
                    run.log()
                for work in periodic:  # evaluation, the callbacks', a stop request, checkpoints
                    if work.due(state.step, last):
                        run.perform(work)
            run.finish([work for work in periodic if work.at_end])
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if not runtime.is_out_of_memory(exc):
            raise
        raise OutOfMemory(f"out of memory at step {state.step}{runtime.memory_hint(device)}") from None
    finally:
        io.display.close()
        logger.close()
    return run.summary(hooks.stage)


def _prepare(model: torch.nn.Module, trainer: TrainerConfig, world: distributed.World, device: torch.device,
             dtype: torch.dtype, fill: Optional[Callable[[torch.nn.Module], None]],
             batch_hooks: Sequence[BatchHook]) -> torch.nn.Module:
    """The model on its device, wrapped for the strategy with its loss, its weights filled."""
    if not any(p.is_meta for p in model.parameters()):
        model.to(device)
    model.train()
    if trainer.activation_checkpointing:
        runtime.enable_activation_checkpointing(model)
    if trainer.compile:
        runtime.compile_layers(model)
    blocks = runtime.decoder_layers(model)
    objective = distributed.wrap(CausalLMObjective(model, batch_hooks), blocks, trainer.strategy, world, device, dtype)
    distributed.materialize(model, device, fill)
    return objective


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """While active, SIGINT and SIGTERM are noted (the list gets the signal number) instead of
    killing the process, so the loop can finish its step and save. A second Ctrl-C stops at once;
    a repeated SIGTERM (e.g. sent both to the process group and by a launcher) changes nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, frame: Any) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not received:
            received.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
