"""Run the real ``satrun`` command in a subprocess, in a temporary working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

# A short, cheap run of the tiny random model: what the end-to-end tests vary from.
TINY = ["model=tiny", "trainer.seq_len=64", "trainer.max_steps=10", "trainer.log_every=2", "trainer.eval_every=5",
        "trainer.eval_batches=2"]


def run_satrun(args: list[str], cwd: Path, memory_limit: Optional[int] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("SATRUN_DEBUG", None)

    def limit_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run(
        [sys.executable, "-m", "satrun", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        preexec_fn=limit_memory if memory_limit else None,
    )


@pytest.fixture
def satrun(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    def call(*args: str, memory_limit: Optional[int] = None) -> subprocess.CompletedProcess:
        return run_satrun(list(args), tmp_path, memory_limit=memory_limit)

    return call


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
