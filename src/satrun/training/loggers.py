"""Where train and eval records go: metrics.jsonl always, plus TensorBoard or Weights & Biases.

A logger takes the loop's records (flat dicts with ``kind`` "train", "eval" or "benchmark" and ``step``) and
is closed at the end. Numeric fields become scalars named ``<kind>/<field>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from satrun.config import LoggerConfig
from satrun.errors import UsageError


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonLines:
    """Append-only JSON-lines file, flushed after each record so a crash keeps what was logged.

    With ``keep_through`` (a resumed run), records after that step, written by the interrupted
    run after its last checkpoint, are dropped first, so the file reads as one run.
    """

    def __init__(self, path: Path, keep_through: Optional[int] = None) -> None:
        self.path = path
        if keep_through is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if (step := _step_of(line)) is not None and step <= keep_through]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            tmp.replace(path)
        self._handle = path.open("a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _step_of(line: str) -> Optional[int]:
    """The step of a JSON-lines record; None for a line torn by a crash."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, folder: Path, keep_through: Optional[int] = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UsageError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from exc
        purge = None if keep_through is None else keep_through + 1  # drop the interrupted run's later events
        self._writer = SummaryWriter(log_dir=str(folder), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        for name, value in _scalars(record).items():
            self._writer.add_scalar(name, value, global_step=record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandB:
    def __init__(self, cfg: LoggerConfig, folder: Path, run_name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise UsageError("logger=wandb needs the wandb package: pip install wandb") from exc
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self._run = wandb.init(project=cfg.project, mode=cfg.mode, dir=str(folder), name=run_name, config=config,
                                   reinit="create_new")
        except Exception as exc:  # no login, no network, bad project: wandb raises many kinds
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"logger=wandb logger.mode={cfg.mode}: wandb could not start ({first}); "
                             "run `wandb login`, or use logger.mode=offline") from exc

    def log(self, record: dict[str, Any]) -> None:
        self._run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self._run.finish()


class Fanout:
    """Several loggers as one."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], keep_through: Optional[int] = None) -> Fanout:
    """metrics.jsonl, plus the configured backend."""
    loggers: list[Logger] = [JsonLines(run_dir / "metrics.jsonl", keep_through)]
    if cfg.name == "tensorboard":
        loggers.append(TensorBoard(run_dir / "tb", keep_through))
    elif cfg.name == "wandb":
        loggers.append(WandB(cfg, run_dir, run_dir.name, config))
    return Fanout(loggers)
