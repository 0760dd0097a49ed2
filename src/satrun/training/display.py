"""What the user sees while training: a progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

log = logging.getLogger("satrun")


class Display(Protocol):
    def start(self, total_steps: int, first_step: int) -> None: ...
    def train(self, record: dict[str, Any]) -> None: ...
    def eval(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def _train_line(r: dict[str, Any]) -> str:
    stage = f" stage {r['stage']}" if "stage" in r else ""
    if "mlp_rate" in r:
        stage += f" (rate {r['mlp_rate']:.2f}/{r['attn_rate']:.2f})"
    return (
        f"step {r['step']} loss {r['loss']:.4f} lr {r['lr']:.2e} grad_norm {r['grad_norm']:.3f} "
        f"tokens/s {r['tokens_per_s']:.0f}{stage}"
    )


class QuietDisplay:
    """Shows nothing: the display of every rank but the first."""

    def start(self, total_steps: int, first_step: int) -> None:
        pass

    def train(self, record: dict[str, Any]) -> None:
        pass

    def eval(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LogDisplay:
    """One line per logged step, through the logging system (console and the run's log file)."""

    def start(self, total_steps: int, first_step: int) -> None:
        self.total = total_steps

    def train(self, record: dict[str, Any]) -> None:
        log.info("%s/%d %s", record["step"], self.total, _train_line(record).split(" ", 2)[2])

    def eval(self, record: dict[str, Any]) -> None:
        log.info("eval step %d loss %.4f ppl %.2f", record["step"], record["eval_loss"], record["eval_ppl"])

    def message(self, text: str) -> None:
        log.info(text)

    def close(self) -> None:
        pass


class BarDisplay:
    """A rich progress bar with loss, tokens/s and ETA; evaluations print above it."""

    def __init__(self) -> None:
        self.console = Console()
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  tok/s {task.fields[tps]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )

    def start(self, total_steps: int, first_step: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=first_step, loss="-", tps="-")

    def train(self, record: dict[str, Any]) -> None:
        self.progress.update(
            self.task, completed=record["step"], loss=f"{record['loss']:.4f}", tps=f"{record['tokens_per_s']:.0f}"
        )

    def eval(self, record: dict[str, Any]) -> None:
        self.console.print(f"eval step {record['step']}: loss {record['eval_loss']:.4f} ppl {record['eval_ppl']:.2f}")

    def message(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        self.progress.stop()


def make_display(mode: str) -> Display:
    """``auto`` shows a bar only when stdout is a terminal, so log files get no bar spam."""
    use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
    return BarDisplay() if use_bar else LogDisplay()


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="satrun summary", show_header=False)
    rows = [
        ("steps", f"{summary['steps']}"),
        ("tokens (labelled)", f"{summary['tokens']:,}"),
        ("train loss", f"{summary['train_loss']:.4f}"),
        ("eval loss (start -> end)", f"{summary['initial_eval_loss']:.4f} -> {summary['eval_loss']:.4f}"),
        ("eval perplexity", f"{summary['eval_ppl']:.2f}"),
        ("tokens/s", f"{summary['tokens_per_s']:.0f}"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
    ]
    start = summary.get("initial_benchmark") or {}
    for name, value in (summary.get("benchmark") or {}).items():
        rows.append((f"benchmark {name}" + (" (start -> end)" if name in start else ""),
                     f"{start[name]:.4f} -> {value:.4f}" if name in start else f"{value:.4f}"))
    if summary.get("peak_mem_bytes"):
        rows.append(("peak memory", f"{summary['peak_mem_bytes'] / 2**30:.2f} GiB"))
    rows.append(("final model", str(summary["final_dir"])))
    for key, value in rows:
        table.add_row(key, value)
    console = Console()
    console.print(table)
    stages = summary.get("stages") or []
    if any("mlp_rate" in stage for stage in stages):
        per_stage = Table(title="throughput per stage")
        for column in ("stage", "steps", "mlp/attn rate", "tokens/s", "s/step", "scoring+selection"):
            per_stage.add_column(column, justify="left" if column == "stage" else "right")
        for st in stages:
            per_stage.add_row(
                st["name"], str(st["steps"]), f"{st['mlp_rate']:.2f}/{st['attn_rate']:.2f}",
                f"{st['tokens_per_s']:.0f}", f"{st['step_s']:.3f}", f"{100 * st.get('select_share', 0.0):.1f}%",
            )
        console.print(per_stage)
