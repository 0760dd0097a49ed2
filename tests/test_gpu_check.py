"""scripts/gpu_check.sh --smoke: every check of the GPU script runs, at tiny sizes on the CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every check of the GPU script, on the CPU

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_check_in_smoke_mode(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = result["checks"]
    assert set(checks) == {"alignment", "breakdown", "sync_debug", "memory", "checkpointing", "determinism", "fsdp", "bench"}
    assert not [name for name, c in checks.items() if "error" in c], checks
    assert {r["kind"] for r in checks["alignment"]["rows"]} == {"aligned", "unaligned"}
    assert set(checks["breakdown"]["seconds"]) >= {"scoring", "selection", "gathers", "fill", "sparse_forward_backward"}
    assert checks["determinism"]["bitwise_equal"]  # on the CPU; on CUDA the script reports what it finds
    assert checks["fsdp"]["backend"] == "gloo" and checks["fsdp"]["sat"]["sharded"]
    assert checks["fsdp"]["sat"]["fused_adamw"]  # AdamW fused over FSDP2's DTensor shards
    assert all(isinstance(checks["bench"][k], list) for k in ("aligned", "unaligned", "aligned, compiled", "lora"))
    assert all(row["profile_s"]["matmul"] > 0 for row in checks["bench"]["lora"])
    memory = checks["memory"]["peak_bytes"]
    assert memory["sat_mean_fill"] > 0 and memory["dense"] > 0
    assert "written to" in done.stdout
