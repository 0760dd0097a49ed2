"""Sweeps: one folder per job, a failed job recorded without stopping the others, a summary."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.cli.conftest import TINY

PLOTS = ("loss_curves.png", "throughput_vs_rate.png")


def _rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "sweep_summary.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_records_a_failed_job_and_summarizes_all(satrun, tmp_path: Path) -> None:
    result = satrun("train", "-m", *TINY, "scheduler.rate=0.3,0.5,1.5", "hydra.sweep.dir=sweep")
    assert result.returncode == 1
    assert "job 2 failed" in result.stderr and "scheduler.rate" in result.stderr
    sweep = tmp_path / "sweep"
    assert (sweep / "0" / "final").is_dir() and (sweep / "1" / "final").is_dir()
    assert not (sweep / "2" / "final").exists() and (sweep / "2" / "error.txt").is_file()

    rows = _rows(sweep)
    assert [(r["job"], r["status"], r["rate"]) for r in rows] == [("0", "ok", "0.3"), ("1", "ok", "0.5"), ("2", "failed", "1.5")]
    assert "scheduler.rate=0.5" in rows[1]["overrides"] and float(rows[1]["eval_loss"]) > 0
    assert float(rows[0]["tokens_per_s[sparse]"]) > 0 and float(rows[1]["tokens_per_s[dense]"]) > 0
    assert "scheduler.rate" in rows[2]["error"] and rows[2]["eval_loss"] == ""
    for name in PLOTS:
        assert (sweep / name).read_bytes().startswith(b"\x89PNG")
    assert "satrun runs" in result.stdout  # the table on the terminal

    before = (sweep / "sweep_summary.csv").read_text()
    for name in ("sweep_summary.csv", *PLOTS):
        (sweep / name).unlink()
    report = satrun("report", "sweep")
    assert report.returncode == 0, report.stderr
    assert (sweep / "sweep_summary.csv").read_text() == before
    assert all((sweep / name).is_file() for name in PLOTS)


def test_report_of_single_runs_into_another_folder(satrun, tmp_path: Path) -> None:
    assert satrun("train", *TINY, "scheduler=dense", "hydra.run.dir=a").returncode == 0
    report = satrun("report", "a", "--out", "cmp")
    assert report.returncode == 0, report.stderr
    assert [r["status"] for r in _rows(tmp_path / "cmp")] == ["ok"]


def test_report_of_a_folder_without_runs_is_a_usage_error(satrun, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = satrun("report", "empty")
    assert result.returncode == 2 and "empty" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_signal_stops_the_whole_sweep(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "satrun", "train", "-m", *TINY, "trainer.max_steps=400",
                             "optim.lr=1e-4,2e-4", "hydra.sweep.dir=sweep"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sweep" / "0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert (tmp_path / "sweep" / "0" / "checkpoints").is_dir()
    assert not (tmp_path / "sweep" / "1" / "metrics.jsonl").exists()  # the next job did not train
