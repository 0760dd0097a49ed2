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


def run_in_process(args: list[str], cwd: Path, capsys: Optional[pytest.CaptureFixture] = None) -> subprocess.CompletedProcess:
    """The CLI's main() in this process, as the command would run: its exit status and output
    (with ``capsys``; without, for module-scoped runs, the output is not kept). It saves the
    interpreter start-up and imports (about 7 s on two cores) of a subprocess."""
    import traceback

    from satrun.cli.main import main

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv("TOKENIZERS_PARALLELISM", "false")
        patch.delenv("SATRUN_DEBUG", raising=False)
        if capsys is not None:
            capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # Hydra's --help ends with sys.exit(0)
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # as the interpreter would: a traceback and status 1
            traceback.print_exc()
            code = 1
        out = capsys.readouterr() if capsys is not None else None
    return subprocess.CompletedProcess(["satrun", *args], code, out.out if out else "", out.err if out else "")


@pytest.fixture
def satrun(tmp_path: Path, capsys: pytest.CaptureFixture) -> Callable[..., subprocess.CompletedProcess]:
    """``satrun(*args)``: the command in ``tmp_path``, in this process (a subprocess where an
    address-space limit applies)."""
    def call(*args: str, memory_limit: Optional[int] = None) -> subprocess.CompletedProcess:
        if memory_limit:
            return run_satrun(list(args), tmp_path, memory_limit=memory_limit)
        return run_in_process(list(args), tmp_path, capsys)

    return call


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
