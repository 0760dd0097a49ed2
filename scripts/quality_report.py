"""Held-out loss against training FLOPs and wall time, for finished satrun runs.

    python scripts/quality_report.py OUT_DIR [--bench BENCH_JSON] LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Each run's training FLOPs come from the FLOP model (satrun.perf.flops): runs whose train records
carry ``train_flops`` (the step's real token counts at its rates; every run since the SFT token
split) are plotted against those, in PFLOPs, and their FLOP fraction is against the first run
given; older runs step by step: a step of stage S costs 1 / ideal_speedup(S) dense steps (its own
per-layer rates, align and layers), so the x axis is in dense steps of the same batch. Training time: with --bench, each step costs the
step time `satrun bench` measured for its configuration (dense and sparse side by side in one
process: the "dense" row, and the row of the stage's MLP rate), so runs made one beside another
still compare fairly; stages the bench did not time leave the run off that plot. Without it,
the run's own elapsed training time (train records' elapsed_s). Writes quality.json, a
markdown table (quality.md) and two plots (loss_vs_flops.png, loss_vs_time.png) into OUT_DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from satrun.config import from_dict  # noqa: E402
from satrun.perf.flops import ideal_speedup  # noqa: E402
from satrun.perf.plan import shape_of  # noqa: E402
from satrun.sat import build_stages, stage_at  # noqa: E402


def _bench_step_s(rows: list[dict[str, Any]], stage: Any, omit: str) -> float | None:
    """The bench's step time for a stage: the dense row, or the row of the stage's MLP rate in the
    run's form (``scheduler.omit``: rows "rate"/"layer rates" forward, "backward" rows backward)."""
    if stage.dense:
        return next(r["step_s"] for r in rows if r["name"] == "dense")
    if stage.mlp_layer_rates is not None:  # per-layer rates: the bench's "layer rates" row, where it timed them
        rows = sorted(rows, key=lambda r: r["name"] != "layer rates")
    for r in rows:
        if r["name"].startswith(("rate ", "layer rates", "backward ")) and r.get("omit", "forward") == omit \
                and abs(r["rate"] - stage.mlp_rate) < 1e-6:
            return r["step_s"]
    return None


def read_run(folder: Path, bench: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    cfg = from_dict({k: v for k, v in raw.items() if k != "hydra"})
    shape, t = shape_of(cfg.model), cfg.trainer
    stages = build_stages(cfg.scheduler, t.max_steps)
    cost = {}
    for stage in stages:
        mlp, attn = stage.per_layer(shape.layers, cfg.scheduler.layers)
        cost[stage.name] = 1.0 / ideal_speedup(shape, t.seq_len, mlp, attn, cfg.selector.align_on("cpu")) if not stage.dense else 1.0
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records if r["kind"] == "train"}
    flops_at, total = [0.0], 0.0
    times: list[float | None] = [0.0]
    for step in range(t.max_steps):
        stage = stage_at(stages, step)
        total += cost[stage.name]
        flops_at.append(total)
        if bench is not None:
            step_s = _bench_step_s(bench, stage, cfg.scheduler.omit)
            times.append(None if step_s is None or times[-1] is None else times[-1] + step_s)
    if bench is not None:
        elapsed = dict(enumerate(times))
    evals = [(r["step"], r["eval_loss"]) for r in records if r["kind"] == "eval"]
    summary = json.loads((folder / "summary.json").read_text())
    train = [r for r in records if r["kind"] == "train"]
    measured = "train_flops" in summary and all("train_flops" in r for r in train)
    pflops = {0: 0.0, **{r["step"]: r["train_flops"] / 1e15 for r in train}} if measured else {}
    return {
        "steps": t.max_steps,
        "flop_fraction": total / t.max_steps,
        "dense_step_equivalents": total,
        "initial_eval_loss": summary["initial_eval_loss"],
        "eval_loss": summary["eval_loss"],
        "train_s": summary["train_s"] if bench is None else elapsed.get(t.max_steps),
        "train_flops": summary["train_flops"] if measured else None,
        "curve": [{"step": s, "dense_steps": flops_at[s], "pflops": pflops.get(s),
                   "train_s": elapsed.get(s, 0.0 if s == 0 else None), "eval_loss": v} for s, v in evals],
        "stages": [{"name": s.name, "steps": s.steps, "mlp_rate": s.mlp_rate, "attn_rate": s.attn_rate} for s in stages],
        "run_dir": str(folder),
    }


def plot(runs: dict[str, dict[str, Any]], key: str, xlabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    for i, (label, run) in enumerate(runs.items()):
        points = [(p[key], p["eval_loss"]) for p in run["curve"] if p[key] is not None]
        style = "--" if label.startswith("dense") else "-"
        ax.plot(*zip(*points), style + "o", color=f"C{i % 10}", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out loss (dense evaluation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str]) -> int:
    bench = None
    if len(argv) > 2 and argv[1] == "--bench":
        bench = json.loads(Path(argv[2]).read_text())
        argv = [argv[0], *argv[3:]]
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    runs = {label: read_run(Path(folder), bench) for label, folder in (a.split("=", 1) for a in argv[1:])}
    measured = all(r["train_flops"] is not None for r in runs.values())
    if measured:  # FLOPs as counted during training, against the first run's
        first = next(iter(runs.values()))["train_flops"]
        for r in runs.values():
            r["flop_fraction"] = r["train_flops"] / first
    (out / "quality.json").write_text(json.dumps(runs, indent=2) + "\n")
    lines = [f"| run | steps | FLOPs ({next(iter(runs)) if measured else 'dense'} = 1) | held-out loss: start | end | "
             "training time (s) |", "|---|---|---|---|---|---|"]
    for label, r in runs.items():
        time = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        lines.append(f"| {label} | {r['steps']} | {r['flop_fraction']:.3f} | {r['initial_eval_loss']:.4f} | "
                     f"{r['eval_loss']:.4f} | {time} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if measured:
        plot(runs, "pflops", "training FLOPs (PFLOP; FLOP model, the steps' real token counts)", out / "loss_vs_flops.png")
    else:
        plot(runs, "dense_steps", "training FLOPs, in dense steps of 4 x 256 tokens (FLOP model)", out / "loss_vs_flops.png")
    xlabel = "training time (s; steps timed by satrun bench)" if bench else "training time (s, this machine)"
    plot({k: v for k, v in runs.items() if v["train_s"] is not None}, "train_s", xlabel, out / "loss_vs_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
