"""PNG pictures of results, drawn off-screen (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str = "", legend_size: float = 9,
          legend_outside: bool = False) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if handles and legend_outside:  # many entries: beside the axes, never over the curves
        ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  ncol=1 + (len(handles) - 1) // 30)
    elif handles:
        ax.legend(fontsize=legend_size)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def run_colors(count: int) -> list[Any]:
    """One colour per run, no two alike: matplotlib's 10 (or 20) qualitative colours while they
    suffice, else evenly spaced samples of a perceptually ordered map."""
    if count <= 10:
        return [f"C{i}" for i in range(count)]
    if count <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(count)]
    cmap = plt.get_cmap("turbo")
    return [cmap(0.05 + 0.9 * i / (count - 1)) for i in range(count)]


def speedup_plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "satrun bench") -> Path:
    """Measured and ideal speed-up over the dense step against the omission rate."""
    sparse = sorted((r for r in rows if r["name"].startswith("rate ")), key=lambda r: r["rate"])
    rates = [0.0] + [r["rate"] for r in sparse]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot(rates, [1.0] + [r["ideal_speedup"] for r in sparse], "--o", color="grey", label="ideal (FLOP model)")
    ax.plot(rates, [1.0] + [r["speedup"] for r in sparse], "-o", color="tab:blue", label="measured")
    for r in rows:
        if r["name"] == "layer rates":  # per-layer MLP rates: placed at their mean rate
            ax.plot([r["rate"]], [r["speedup"]], "*", color="tab:red", markersize=10, label="layer rates (mean)")
            ax.plot([r["rate"]], [r["ideal_speedup"]], "*", color="grey", markersize=8)
    return _save(fig, ax, path, "omission rate", "speed-up over dense step", title)


def loss_curves_plot(runs: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path:
    """Train loss (lines) and held-out loss (markers) against the step, one colour per run;
    beyond six runs the legend goes beside the plot."""
    many = len(runs) > 6
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for color, (label, found) in zip(run_colors(len(runs)), runs.items()):
        if found["train"]:
            ax.plot(*zip(*found["train"]), color=color, label=label, linewidth=1.0 if many else 1.5)
        if found["eval"]:
            ax.plot(*zip(*found["eval"]), "o--", color=color, alpha=0.6, markersize=3 if many else 4)
    return _save(fig, ax, path, "step", "loss (line: train, dots: held-out)", legend_size=7, legend_outside=many)


def throughput_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Tokens/s of each finished run (whole run and each stage) against its scheduler.rate."""
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    rated = sorted((r for r in rows if r.get("rate") is not None), key=lambda r: r["rate"])
    series = ["tokens_per_s"] + sorted({k for r in rated for k in r if k.startswith("tokens_per_s[")})
    for key in series:
        points = [(r["rate"], r[key]) for r in rated if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-" if key == "tokens_per_s" else "o:",
                    label="whole run" if key == "tokens_per_s" else key[len("tokens_per_s["):-1])
    return _save(fig, ax, path, "scheduler.rate (omission rate)", "tokens/s", legend_size=7)


def probe_plot(result: dict[str, Any], path: Path, title: str = "satrun probe") -> Path:
    """Sub-network loss against the ideal speed-up, one line per metric (and the calibrated point)."""
    fig, ax = plt.subplots(figsize=(5.6, 4), dpi=120)
    speedups = [1.0] + list(result["ideal_speedups"])
    colors = run_colors(len(result["loss"]))
    for i, (name, losses) in enumerate(result["loss"].items()):
        ax.plot(speedups, [result["dense_loss"]] + list(losses), "-o", color=colors[i], markersize=4, label=name)
    calibration = result.get("calibration")
    if calibration:
        ax.plot([calibration["ideal_speedup"]], [calibration["calibrated_loss"]], "*", color="black", markersize=12,
                label=f"{result['metric']}, calibrated per layer")
    return _save(fig, ax, path, "ideal speed-up of a sparse step (FLOP model)", "loss of the sub-network", title, legend_size=8)
