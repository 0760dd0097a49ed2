"""Compare finished runs: a CSV row per run, loss curves, and tokens/s against the omission rate.

Works from the run folders alone (``.hydra/`` for the overrides and config, ``summary.json`` or
``error.txt`` for the outcome, ``metrics.jsonl`` for the curves, benchmark scores from the
summary or a ``satrun eval`` folder's eval.json), so a sweep's summary can be rebuilt at any
time with ``satrun report``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from satrun.errors import UsageError

ERROR_FILE = "error.txt"  # a failed job's one-line reason, written by the CLI
EVAL_FILE = "eval.json"  # satrun eval's results
BENCHMARK = "benchmark:"  # the prefix of benchmark score columns
COLUMNS = ["job", "status", "overrides", "rate", "steps", "train_loss", "initial_eval_loss", "eval_loss",
           "tokens_per_s", "wall_s", "error", "run_dir"]


def is_run(folder: Path) -> bool:
    return (folder / ".hydra").is_dir() or (folder / "metrics.jsonl").is_file() or (folder / EVAL_FILE).is_file()


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run folders among ``paths``: each path is a run folder or holds run folders (a sweep)."""
    runs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UsageError(f"{path}: no such folder")
        if is_run(path):
            runs.append(path)
            continue
        inside = [p for p in path.iterdir() if p.is_dir() and is_run(p)]
        if not inside:
            raise UsageError(f"{path}: neither a run folder nor a folder of runs")
        runs.extend(sorted(inside, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)))
    return runs


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def summarize(run: Path) -> dict[str, Any]:
    """One row: how the run was configured, how it ended, and its numbers."""
    summary = _read_json(run / "summary.json")
    config = _yaml(run / ".hydra" / "config.yaml") or {}
    overrides = _yaml(run / ".hydra" / "overrides.yaml") or []
    error = (run / ERROR_FILE).read_text(encoding="utf-8").strip() if (run / ERROR_FILE).is_file() else ""
    row: dict[str, Any] = {
        "job": run.name,
        "status": "ok" if summary else ("failed" if error else "incomplete"),
        "overrides": " ".join(overrides),
        "rate": 0.0 if (config.get("scheduler") or {}).get("name") == "dense" else (config.get("scheduler") or {}).get("rate"),
        "error": error,
        "run_dir": str(run),
    }
    if summary:
        row.update({k: summary.get(k) for k in ("steps", "train_loss", "initial_eval_loss", "eval_loss", "tokens_per_s", "wall_s")})
        for stage in summary.get("stages", []):
            row[f"tokens_per_s[{stage['name']}]"] = stage["tokens_per_s"]
    row.update(benchmark_scores(run, summary))
    if not summary and not error and any(k.startswith(BENCHMARK) for k in row):
        row["status"] = "ok"  # a satrun eval folder
    return row


def benchmark_scores(run: Path, summary: Any) -> dict[str, float]:
    """``benchmark:task/metric`` columns: the run's last benchmark (trainer.benchmark_every),
    and the scores of an eval.json in the folder (satrun eval)."""
    scores = dict((summary or {}).get("benchmark") or {})
    evaluated = _read_json(run / EVAL_FILE)
    if isinstance(evaluated, dict):
        scores.update((evaluated.get("satrun") or {}).get("scores") or {})
    return {f"{BENCHMARK}{name}": value for name, value in scores.items()}


def curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) of the train and eval records of a run."""
    found: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write (training itself skips it too)
            if record.get("kind") in found:  # benchmark records are not loss curves
                key = "loss" if record["kind"] == "train" else "eval_loss"
                found[record["kind"]].append((record["step"], record[key]))
    return found


def write_report(runs: Sequence[Path], out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """sweep_summary.csv, loss_curves.png and throughput_vs_rate.png in ``out_dir``."""
    from satrun.plots import loss_curves_plot, throughput_plot

    rows = [summarize(run) for run in runs]
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_columns = sorted({k for row in rows for k in row if k.startswith("tokens_per_s[")})
    extra_columns = stage_columns + sorted({k for row in rows for k in row if k.startswith(BENCHMARK)})
    table = out_dir / "sweep_summary.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + extra_columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    labels = distinct_labels(rows)
    losses = loss_curves_plot({label: curves(run) for label, run in zip(labels, runs)}, out_dir / "loss_curves.png")
    speed = throughput_plot([row for row in rows if row["status"] == "ok"], out_dir / "throughput_vs_rate.png")
    return rows, [table, losses, speed]


def distinct_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Each run's legend label: the overrides that tell it from the other runs (those all runs
    share say nothing), else its job name; a label two runs would share gets the job name too,
    and then, where still shared (two sweeps' job 0), the run's folder and parent."""
    overrides = [row["overrides"].split() for row in rows]
    shared = set.intersection(*map(set, overrides)) if len(rows) > 1 else set()
    labels = [" ".join(o for o in own if o not in shared) or row["job"] for own, row in zip(overrides, rows)]
    labels = [f"{row['job']}: {label}" if labels.count(label) > 1 and label != row["job"] else label
              for label, row in zip(labels, rows)]
    return [f"{Path(row['run_dir']).parent.name}/{Path(row['run_dir']).name}: {label}" if labels.count(label) > 1 else label
            for label, row in zip(labels, rows)]


def print_report(rows: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="satrun runs")
    for column in ("job", "status", "overrides", "eval loss", "tokens/s", "wall s"):
        table.add_column(column)

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in rows:
        table.add_row(row["job"], row["status"], row["overrides"] or "-", fmt(row.get("eval_loss"), ".4f"),
                      fmt(row.get("tokens_per_s"), ".0f"), fmt(row.get("wall_s"), ".1f"))
    Console().print(table)
