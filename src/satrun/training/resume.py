"""Whether a training run may start in its run folder, and from where.

A folder that holds a run (its metrics, checkpoints, final model or summary) is never written
over without being asked: a plain start there is refused; ``resume=auto`` continues it from its
newest intact checkpoint, leaves a finished run alone, and refuses to extend a finished run that
saved no checkpoint; ``trainer.overwrite=true`` replaces it. Every rank takes the first rank's
answer (ranks without a shared file system must not each decide).
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from satrun.checks import unread_keys
from satrun.config import TrainConfig
from satrun.errors import UsageError
from satrun.report import ERROR_FILE  # a failed start's reason: stale once a start succeeds
from satrun.training import checkpoint, distributed

# What a training run writes into its folder (besides Hydra's .hydra/ and log): the outputs that
# make a folder "hold a run", and that trainer.overwrite=true removes.
OUTPUTS = ("metrics.jsonl", "summary.json", "final", "checkpoints", "samples.jsonl", "tb", "wandb", "base")


@dataclass(frozen=True)
class HeldRun:
    """The run a folder holds."""

    outputs: list[Path]
    checkpoints: list[Path]
    summary: Optional[dict[str, Any]]  # a finished run's summary.json (with its final/)

    def describe(self) -> str:
        if self.summary is not None:
            return f"finished after {self.summary.get('steps')} steps"
        if self.checkpoints:
            return f"stopped; newest checkpoint {self.checkpoints[-1].name}"
        return "stopped before its first checkpoint"


@dataclass(frozen=True)
class Start:
    """How a run starts: from a checkpoint, afresh (removing ``clear`` first), or not at all
    because the run in the folder already finished (``finished``: its summary)."""

    checkpoint: Optional[Path] = None
    clear: list[Path] = field(default_factory=list)
    finished: Optional[dict[str, Any]] = None


def held_run(run_dir: Path) -> Optional[HeldRun]:
    """The run in ``run_dir``, if any of a run's outputs are there."""
    outputs = [run_dir / name for name in OUTPUTS if (run_dir / name).exists()]
    checkpoints = checkpoint.checkpoints_in(run_dir / "checkpoints")
    if not checkpoints and not [p for p in outputs if p.name != "checkpoints"]:  # at most a killed save's staging
        return None
    summary = None
    if (run_dir / "summary.json").is_file() and (run_dir / "final").is_dir():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            summary = None
    return HeldRun(outputs, checkpoints, summary if isinstance(summary, dict) else None)


def plan_start(resume: Optional[str], overwrite: bool, max_steps: int, run_dir: Path,
               say: Callable[[str], None]) -> Start:
    """Where a run in ``run_dir`` starts (see the module's text); a start that would lose or mix
    up a run already there is refused in one line."""
    start = _plan_start(resume, overwrite, max_steps, run_dir, say)
    stale = run_dir / ERROR_FILE
    return replace(start, clear=[*start.clear, stale]) if stale.is_file() and start.finished is None else start


def _plan_start(resume: Optional[str], overwrite: bool, max_steps: int, run_dir: Path,
                say: Callable[[str], None]) -> Start:
    held = held_run(run_dir)
    if overwrite:
        if resume is not None:
            raise UsageError(f"trainer.overwrite=true starts the run in {run_dir} afresh; it does not go with resume={resume}")
        if held is not None:
            say(f"trainer.overwrite=true: replacing the run in {run_dir} ({held.describe()})")
        return Start(clear=held.outputs if held else [])
    if held is None:
        return Start(checkpoint=checkpoint.resume_point(resume, run_dir, say))
    fresh = "train into another folder (hydra.run.dir=...), or replace it with trainer.overwrite=true"
    if resume is None:
        raise UsageError(f"{run_dir} already holds a run ({held.describe()}): continue it with resume=auto, {fresh}")
    if resume != "auto":
        point = checkpoint.resume_point(resume, run_dir, say)
        if point is not None and not point.resolve().is_relative_to(run_dir.resolve()):
            raise UsageError(f"{run_dir} already holds a run ({held.describe()}) and resume={resume} continues another "
                             f"one; {fresh}")
        return Start(checkpoint=point)
    steps = held.summary.get("steps", -1) if held.summary is not None else None
    if steps is not None and steps >= max_steps:
        return Start(finished=held.summary)
    if held.checkpoints:
        return Start(checkpoint=checkpoint.resume_point(resume, run_dir, say))
    if steps is not None:
        raise UsageError(f"resume=auto: the run in {run_dir} finished after {steps} steps without a checkpoint "
                         f"(trainer.save_every=0), so it cannot continue to trainer.max_steps={max_steps}; {fresh}")
    say(f"resume=auto: the run in {run_dir} stopped before its first checkpoint; starting again from step 0")
    return Start(clear=held.outputs)


def agreed_start(cfg: TrainConfig, run_dir: Path, say: Callable[[str], None], main: bool) -> Start:
    """:func:`plan_start` on the first rank; every rank takes its answer (or its error)."""
    answer: tuple[str, Any] = ("ok", None)
    if main:
        try:
            answer = ("ok", plan_start(cfg.resume, cfg.trainer.overwrite, cfg.trainer.max_steps, run_dir, say))
        except UsageError as exc:
            answer = ("error", str(exc))
    status, value = distributed.from_main(answer)
    if status == "error":
        raise UsageError(value)
    return value


def clear(start: Start) -> None:
    """Remove the outputs of the run a fresh start replaces (the first rank, once every check passed)."""
    for path in start.clear:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def settings(cfg: TrainConfig, ranks: int) -> dict[str, Any]:
    """What shapes the run's schedules and batches: a resume must not change it silently."""
    t = cfg.trainer
    shaped = {"trainer.max_steps": t.max_steps, "trainer.seq_len": t.seq_len, "trainer.micro_batch_size": t.micro_batch_size,
              "trainer.grad_accum": t.grad_accum, "ranks": ranks, "mode.name": cfg.mode.name, "data.name": cfg.data.name,
              "data.packing": cfg.data.packing, "mode.train_on_inputs": cfg.mode.train_on_inputs}
    shaped.update({f"optim.{k}": v for k, v in asdict(cfg.optim).items()})
    shaped.update({f"adapter.{k}": v for k, v in asdict(cfg.adapter).items()})  # the checkpoint's weights are these
    unread = unread_keys("scheduler", cfg.scheduler.name)  # e.g. a checkpoint of an older calibration's dense run
    shaped.update({f"scheduler.{k}": v for k, v in asdict(cfg.scheduler).items() if k not in unread})
    return shaped


def check_unchanged(resume: dict[str, Any], settings: dict[str, Any]) -> None:
    saved = resume.get("settings") or {}
    changed = [f"{k}={saved[k]} -> {settings[k]}" for k in settings if k in saved and saved[k] != settings[k]]
    if changed:
        raise UsageError(f"resume={resume['folder']}: settings differ from the checkpoint's ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}), which would reshape the run; keep them, or set "
                         "resume_allow_changes=true")


def continue_command(run_dir: Path) -> str:
    """The command that continues a stopped run in its own folder: its overrides, resume=auto."""
    import yaml

    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) if overrides_file.is_file() else []
    kept = [o for o in overrides or []
            if not o.startswith(("resume=", "hydra.run.dir=", "resume_allow_changes=", "trainer.overwrite="))]
    return " ".join(["satrun train", *map(shlex.quote, kept), "resume=auto", shlex.quote(f"hydra.run.dir={run_dir}")])
