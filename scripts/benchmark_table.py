"""The benchmark column of docs/quality.md: each model's satrun eval scores beside its training
FLOPs and held-out loss, as a Markdown table (stdout and OUT/table.md).

    python scripts/benchmark_table.py OUT LABEL=EVAL_FOLDER[:RUN_FOLDER] ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = [("bible_cloze", "acc"), ("bible_cloze", "acc_norm"), ("chatterbot_mc", "acc"), ("chatterbot_mc", "acc_norm")]


def main(out: Path, pairs: list[str]) -> None:
    rows, reference = [], None
    for pair in pairs:
        label, _, folders = pair.partition("=")
        evaluated, _, run = folders.partition(":")
        found = json.loads((Path(evaluated) / "eval.json").read_text())
        summary = json.loads((Path(run) / "summary.json").read_text()) if run else None
        if summary is not None and reference is None:
            reference = summary["train_flops"]
        rows.append((label, found, summary))
    header = ["model", "training FLOPs", "held-out loss"] + [f"{task} {metric}" for task, metric in METRICS] + ["questions"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, found, summary in rows:
        cells = [label, f"{summary['train_flops'] / reference:.3f}" if summary else "-",
                 f"{summary['eval_loss']:.4f}" if summary else "-"]
        for task, metric in METRICS:
            result = found["results"].get(task, {})
            value, err = result.get(f"{metric},none"), result.get(f"{metric}_stderr,none")
            cells.append("-" if value is None else f"{value:.3f}" + (f" ± {err:.3f}" if isinstance(err, float) else ""))
        cells.append(" / ".join(str(found["n-samples"][t]["effective"]) for t in ("bible_cloze", "chatterbot_mc")
                                if t in found["n-samples"]))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
