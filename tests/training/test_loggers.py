"""metrics.jsonl on resume: later records dropped, a line torn by a crash skipped."""

from __future__ import annotations

import json
from pathlib import Path

from satrun.training.loggers import JsonLines


def test_resume_keeps_records_through_the_checkpoint_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "st', encoding="utf-8")  # killed mid-write
    logger = JsonLines(path, keep_through=2)
    logger.log({"kind": "train", "step": 3, "loss": 0.5})
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def test_wandb_online_without_a_login_is_one_usage_error(tmp_path: Path, monkeypatch) -> None:
    import pytest

    pytest.importorskip("wandb")
    from satrun.config import LoggerConfig
    from satrun.errors import UsageError
    from satrun.training.loggers import WandB

    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no stored login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(UsageError) as raised:
        WandB(LoggerConfig(name="wandb", mode="online"), tmp_path / "wandb", "run", {})
    message = str(raised.value)
    assert "\n" not in message and "logger.mode=online" in message and "wandb login" in message
