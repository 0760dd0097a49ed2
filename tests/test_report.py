"""`satrun report` over many runs: a legend that tells them apart, colours that do not repeat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from satrun.plots import run_colors
from satrun.report import distinct_labels, find_runs, write_report


@pytest.mark.parametrize("count", [3, 10, 15, 24, 60])
def test_no_two_runs_share_a_colour(count: int) -> None:
    from matplotlib.colors import to_rgba

    assert len({to_rgba(c) for c in run_colors(count)}) == count


def test_labels_keep_only_what_tells_runs_apart(tmp_path: Path) -> None:
    for job in range(24):
        run = tmp_path / "sweep" / str(job)
        (run / ".hydra").mkdir(parents=True)
        overrides = ["model=tiny", "trainer.max_steps=4", f"scheduler.rate={job % 12 / 20}", f"seed={job // 12}"]
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 3.0 - s * job / 100}) + "\n"
                                                   for s in range(1, 5)))
    runs = find_runs([tmp_path / "sweep"])
    rows, files = write_report(runs, tmp_path / "report")
    labels = distinct_labels(rows)
    assert labels[0] == "scheduler.rate=0.0 seed=0" and labels[13] == "scheduler.rate=0.05 seed=1"
    assert len(set(labels)) == 24 and all(path.stat().st_size > 0 for path in files)
    same = [dict(rows[0], job="a"), dict(rows[0], job="b")]  # identical overrides: the job names tell them apart
    assert distinct_labels(same) == ["a", "b"]
    two_sweeps = [dict(rows[0], run_dir="/x/sweepA/0"), dict(rows[0], run_dir="/x/sweepB/0")]  # job 0 twice
    assert distinct_labels(two_sweeps) == ["sweepA/0: 0", "sweepB/0: 0"]
    assert distinct_labels([dict(rows[0], job="x")]) == ["model=tiny trainer.max_steps=4 scheduler.rate=0.0 seed=0"]
