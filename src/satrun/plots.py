"""PNG pictures of results, drawn off-screen (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def speedup_plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "satrun bench") -> Path:
    """Measured and ideal speed-up over the dense step against the omission rate."""
    sparse = sorted((r for r in rows if r["rate"] > 0), key=lambda r: r["rate"])
    rates = [0.0] + [r["rate"] for r in sparse]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot(rates, [1.0] + [r["ideal_speedup"] for r in sparse], "--o", color="grey", label="ideal (FLOP model)")
    ax.plot(rates, [1.0] + [r["speedup"] for r in sparse], "-o", color="tab:blue", label="measured")
    ax.set_xlabel("omission rate")
    ax.set_ylabel("speed-up over dense step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
