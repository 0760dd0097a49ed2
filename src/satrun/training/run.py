"""A training run's state and the work besides the training step: evaluation, periodic work
(:class:`EveryNSteps`), train records, checkpoints, the non-finite guard, stopping on a
signal, ``final/`` and the summary. The loop itself is :func:`satrun.training.trainer.train`."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from satrun.config import TrainerConfig
from satrun.data import BatchStream, label_tokens, token_counts
from satrun.errors import DiskFull, Interrupted, NonFiniteLoss
from satrun.training import checkpoint, distributed, runtime
from satrun.training.display import Display
from satrun.training.loggers import Logger
from satrun.training.metrics import perplexity
from satrun.training.saving import staged_folder

Batch = dict[str, torch.Tensor]
StepHook = Callable[[int], dict[str, Any]]  # called before each optimizer step; returns record fields
StageFields = Callable[[str, float], dict[str, Any]]  # a stage's name and seconds -> the method's own fields of its summary


@torch.no_grad()
def evaluate(objective: Callable[[Batch, float], torch.Tensor], batches: Sequence[Batch], amp: Any) -> float:
    """Mean next-token loss over all labelled held-out tokens (every rank sees all of them)."""
    objective.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = label_tokens(batch)
        with amp:
            total += float(objective(batch, 1))
        count += n
    objective.train()
    distributed.reshard(objective)
    return total / max(1, count)


@dataclass
class RunState:
    """Everything that advances during training (what a resume would restore)."""

    step: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    padding_tokens: int = 0  # of padded_tokens, those that are padding (this rank's, times the ranks)
    train_flops: float = 0.0  # training FLOPs of the steps so far, all ranks (the FLOP model's)
    train_s: float = 0.0
    wall_s: float = 0.0  # wall-clock time of the launches so far, each up to its last checkpoint
    train_loss: float = float("nan")
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # periodic work's records so far, by kind
    step_log: list[tuple[str, float, int]] = field(default_factory=list)  # (stage, seconds, tokens) per step
    stage_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: int = 0  # steps whose update was skipped (non-finite loss or gradient)


@dataclass
class Interval:
    """The steps since the last train record; a record never spans two stages."""

    loss: torch.Tensor
    steps: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    lr: float = 0.0
    grad_norm: Optional[torch.Tensor] = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunIO:
    """Where a run writes and what it says. ``save_model(folder)`` writes the (unsharded) model
    into a checkpoint, the loop adding its own state; ``save_final(folder)`` writes ``final/``
    where it holds more (e.g. the adapters and the merged model; default: ``save_model``).
    ``logger`` takes the records (default: ``run_dir/metrics.jsonl``). ``settings`` (the run's
    schedule-shaping settings) are kept in each checkpoint for the caller to compare on resume.
    ``launched``: when this launch began (``time.perf_counter()``; default: now); the summary's
    ``wall_s`` adds the earlier launches' time up to their checkpoint."""

    run_dir: Path
    display: Display
    logger: Optional[Logger] = None
    save_model: Optional[Callable[[Path], Any]] = None
    save_final: Optional[Callable[[Path], Any]] = None
    settings: dict[str, Any] = field(default_factory=dict)
    launched: Optional[float] = None


@dataclass(frozen=True)
class EveryNSteps:
    """Periodic work (as lingua's ``every_n_steps``): ``action(step)`` after every ``every``
    steps but the last (0: never), before the first step of a fresh run with ``at_start``, and
    after the last with ``at_end``. An action may return a record (a dict with a ``kind``): the
    loop logs it, keeps it through checkpoints, and puts the first and last of its kind in the
    summary (``initial_<kind>``, ``<kind>``). A step's work is done before its checkpoint, so a
    run resumed from that checkpoint does not do it again."""

    every: int
    action: Callable[[int], Optional[dict[str, Any]]]
    at_start: bool = False
    at_end: bool = True

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every) and step % self.every == 0 and not last


@dataclass
class Run:
    """What the loop's steps share, and the steps besides the training step itself: evaluation,
    periodic work, train records, checkpoints, the non-finite guard, stopping on a signal, the summary."""

    trainer: TrainerConfig
    io: RunIO
    logger: Logger
    model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: BatchStream
    held_out: list[Batch]
    amp: Any
    device: torch.device
    ranks: int
    peak_flops: Optional[float] = None  # per device: records and the summary then carry the model FLOP utilisation
    state: RunState = field(default_factory=RunState)
    interval: Interval = field(init=False)
    last_checkpoint: Optional[Path] = None
    earlier_wall_s: float = 0.0
    launched: float = field(init=False)
    stop_requests: list[int] = field(default_factory=list)  # signals noted while the loop runs

    def __post_init__(self) -> None:
        self.interval = Interval(loss=torch.zeros((), device=self.device))
        self.launched = self.io.launched if self.io.launched is not None else time.perf_counter()

    @property
    def run_dir(self) -> Path:
        return self.io.run_dir

    @property
    def display(self) -> Display:
        return self.io.display

    def restore(self, resume: dict[str, Any]) -> None:
        """Continue from a checkpoint's training state (:func:`checkpoint.load_state`)."""
        checkpoint.restore(self.model, self.optimizer, resume)
        self.stream.load_state_dict(resume["data"])
        self.state = RunState(**resume["run"])
        self.earlier_wall_s = self.state.wall_s
        checkpoint.restore_rng(resume["rng"])

    def wall_s(self) -> float:
        return self.earlier_wall_s + time.perf_counter() - self.launched

    def evaluated_last(self) -> bool:
        history = self.state.eval_history
        return bool(history) and history[-1]["step"] == self.state.step and self.state.step > 0

    def evaluate(self) -> None:
        loss = evaluate(self.objective, self.held_out, self.amp)
        record = {"kind": "eval", "step": self.state.step, "eval_loss": loss, "eval_ppl": perplexity(loss)}
        self.logger.log(record)
        self.display.eval(record)
        self.state.eval_history.append(record)

    def perform(self, work: EveryNSteps) -> None:
        """Periodic work at this step; the record it returns, if any, is logged and kept."""
        record = work.action(self.state.step)
        if not isinstance(record, dict):  # (a checkpoint's action returns its folder)
            return
        record = {"kind": record["kind"], "step": self.state.step, **record}
        distributed.reshard(self.objective)  # the work may have run the model's forward (FSDP2)
        self.logger.log(record)
        self.display.message(f"{record['kind']} step {record['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in _scores(record).items()))
        self.state.records.setdefault(record["kind"], []).append(record)

    def stop_if_asked(self) -> None:
        """A signal arrived on some rank: save, then stop with its exit status (SIGTERM: a rank
        the signal did not reach)."""
        if distributed.any_rank(bool(self.stop_requests), self.device):
            self.stop(self.stop_requests[0] if self.stop_requests else signal.SIGTERM)

    def begin_step(self, hooks: Sequence[StepHook]) -> dict[str, Any]:
        """The hooks' fields for this step's record; a record never spans two stages."""
        fields: dict[str, Any] = {}
        for hook in hooks:
            fields.update(hook(self.state.step))
        if self.interval.steps and fields != self.interval.fields:
            self.log()
        self.interval.fields = fields
        self.state.stage_fields.setdefault(fields.get("stage", "train"), fields)
        return fields

    def end_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int, flops: float, seconds: float,
                 lr: float, host_batches: Sequence[Batch], fields: dict[str, Any]) -> None:
        """Count the step; a non-finite loss or gradient (its update was skipped) is counted
        against ``trainer.max_skips`` instead of into the record."""
        state, interval, trainer = self.state, self.interval, self.trainer
        state.step += 1
        state.tokens += tokens
        state.padded_tokens += self.ranks * sum(b["input_ids"].numel() for b in host_batches)
        state.padding_tokens += self.ranks * sum(token_counts(b)[2] for b in host_batches)
        state.train_flops += flops
        state.train_s += seconds
        state.step_log.append((fields.get("stage", "train"), seconds, tokens))
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            state.skipped += 1
            where = f"non-finite loss or gradient at step {state.step} (the update was skipped)"
            if state.skipped > trainer.max_skips:
                kept = self.last_checkpoint or _newest(self.run_dir)
                raise NonFiniteLoss(f"{where}; {state.skipped} such steps exceed trainer.max_skips="
                                    f"{trainer.max_skips}; last checkpoint: {kept or 'none'}")
            self.display.message(f"warning: {where}; {state.skipped} of trainer.max_skips={trainer.max_skips}")
        else:
            interval.loss += loss
            interval.steps += 1
        interval.tokens += tokens
        interval.flops += flops
        interval.seconds += seconds
        interval.lr, interval.grad_norm = lr, grad_norm

    def log(self) -> None:
        """A train record of the steps since the last one."""
        state, interval = self.state, self.interval
        state.train_loss = float(interval.loss) / interval.steps
        record = {
            "kind": "train",
            "step": state.step,
            "loss": state.train_loss,
            "lr": interval.lr,
            "grad_norm": float(interval.grad_norm) if interval.grad_norm is not None else float("nan"),
            "tokens": state.tokens,
            "padded_tokens": state.padded_tokens,
            "tokens_per_s": interval.tokens / interval.seconds,
            "flops": interval.flops,
            "train_flops": state.train_flops,
            "elapsed_s": state.train_s,
            **self.utilisation(interval.flops, interval.seconds),
            **interval.fields,
        }
        self.logger.log(record)
        self.display.train(record)
        interval.loss.zero_()
        interval.steps, interval.tokens, interval.flops, interval.seconds = 0, 0, 0.0, 0.0

    def utilisation(self, flops: float, seconds: float) -> dict[str, float]:
        """``mfu``: the FLOP model's training FLOPs per second over the ranks' peak, where the peak is known."""
        if not self.peak_flops or not seconds:
            return {}
        return {"mfu": flops / seconds / (self.peak_flops * self.ranks)}

    def checkpoint(self) -> Path:
        if self.interval.steps:  # a record never spans a checkpoint, so a resumed run logs the same records
            self.log()
        self.state.wall_s = self.wall_s()
        training_state = {"run": asdict(self.state), "data": self.stream.state_dict(), "rng": checkpoint.rng_state(),
                          "settings": self.io.settings}
        try:
            folder = checkpoint.save_checkpoint(self.run_dir / "checkpoints", self.state.step, self.model, self.optimizer,
                                                training_state, self.io.save_model, self.trainer.keep_checkpoints)
        except DiskFull as exc:
            kept = self.last_checkpoint or _newest(self.run_dir)
            raise DiskFull(f"{exc}; last intact checkpoint: {kept or 'none'}") from None
        self.display.message(f"checkpoint: {folder}")
        self.last_checkpoint = folder
        return folder

    def finish(self, at_end: Sequence[EveryNSteps]) -> None:
        """The last step's periodic work and evaluation and, with ``trainer.save_every``, its
        checkpoint (a run resumed from that checkpoint has all of them), then ``final/``. A
        checkpoint the disk has no room for is a warning here: ``final/``, a third of its size,
        may still fit."""
        if not self.evaluated_last():
            for work in at_end:
                self.perform(work)
            self.evaluate()
            if self.trainer.save_every:
                try:
                    self.checkpoint()
                except DiskFull as exc:
                    self.display.message(f"warning: {exc}; writing final/ all the same")
        self.write_final()

    def write_final(self) -> None:
        """``final/`` through ``save_model``, complete or absent. Should writing it fail in a
        one-process run, the last step is checkpointed first (where it is not yet), so no
        training is lost; on a full disk that may fail too, and the one line then says what was
        kept. (Under several ranks the failure may be one rank's alone: no collective follows.)"""
        save_final = self.io.save_final or self.io.save_model
        if save_final is None:
            return
        try:
            with staged_folder(self.run_dir / "final") as staging:
                save_final(staging)
        except Exception as exc:
            last = f"step_{self.state.step}"
            kept = _newest(self.run_dir)
            if self.ranks == 1 and (kept is None or kept.name != last):
                with contextlib.suppress(Exception):
                    kept = self.checkpoint()
            if not isinstance(exc, DiskFull):
                raise
            if kept is not None and kept.name == last:
                raise DiskFull(f"{exc}; final/ was not written, no training is lost: last intact checkpoint: {kept} "
                               "(the last step)") from None
            raise DiskFull(f"{exc}; final/ was not written, nor a checkpoint of the last step: the steps after the "
                           f"last intact checkpoint are lost (last intact checkpoint: {kept or 'none'})") from None

    def stop(self, number: int) -> None:
        """A signal arrived: save, then stop with its exit status."""
        folder = self.checkpoint()
        raise Interrupted(f"stopped by {signal.Signals(number).name} after step {self.state.step}; "
                          f"checkpoint saved: {folder}", number)

    def summary(self, stage_fields: Optional[StageFields] = None) -> dict[str, Any]:
        """The run's summary; ``stage_fields`` adds a training method's own fields to each stage."""
        state = self.state
        return {
            "steps": state.step,
            "tokens": state.tokens,
            "padded_tokens": state.padded_tokens,
            "padding_share": state.padding_tokens / state.padded_tokens if state.padded_tokens else 0.0,
            "train_flops": state.train_flops,
            "skipped_steps": state.skipped,
            "train_loss": state.train_loss,
            "initial_eval_loss": state.eval_history[0]["eval_loss"],
            "eval_loss": state.eval_history[-1]["eval_loss"],
            "eval_ppl": state.eval_history[-1]["eval_ppl"],
            **{f"{prefix}{kind}": _scores(records[at]) for kind, records in state.records.items()
               for prefix, at in (("initial_", 0), ("", -1))},
            "tokens_per_s": state.tokens / state.train_s if state.train_s else 0.0,
            "train_s": state.train_s,
            **self.utilisation(state.train_flops, state.train_s),
            "wall_s": self.wall_s(),
            "stages": stage_summary(state.step_log, state.stage_fields, stage_fields),
            "peak_mem_bytes": runtime.peak_memory_bytes(self.device),
            "device": str(self.device),
        }


def _scores(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("kind", "step")}


def _newest(run_dir: Path) -> Optional[Path]:
    found = checkpoint.checkpoints_in(run_dir / "checkpoints")
    return found[-1] if found else None


def stage_summary(step_log: Sequence[tuple[str, float, int]], stage_fields: dict[str, dict[str, Any]],
                  more: Optional[StageFields] = None) -> list[dict[str, Any]]:
    """Throughput per stage, in order, with the record fields of its first step and ``more``'s.
    The first steps of a stage (min(2, steps // 4)) are warm-up and left out of its means;
    ``total_s`` counts every step."""
    stages: list[dict[str, Any]] = []
    for name in dict.fromkeys(stage for stage, _, _ in step_log):
        steps = [(s, t) for stage, s, t in step_log if stage == name]
        measured = steps[min(2, len(steps) // 4) :]
        seconds = sum(s for s, _ in measured)
        extra = {k: v for k, v in stage_fields.get(name, {}).items() if k != "stage"}
        total = sum(s for s, _ in steps)
        stages.append({
            "name": name,
            "steps": len(steps),
            **extra,
            "tokens_per_s": sum(t for _, t in measured) / seconds if seconds else 0.0,
            "step_s": seconds / len(measured) if measured else 0.0,
            "total_s": total,
            **(more(name, total) if more else {}),
        })
    return stages
