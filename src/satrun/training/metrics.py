"""The run's ``summary.json`` and the numbers derived for it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
