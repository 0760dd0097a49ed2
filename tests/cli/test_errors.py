"""Bad input: one line on stderr, exit status 2, no traceback, never a half-written final/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import TINY


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_JSONL = '{"text": "fine"}\n{"text": \n'

CASES = {
    "unknown key": (lambda d: ["trainer.max_stepz=3"], "max_stepz"),
    "unknown group option": (lambda d: ["model=nope"], "nope"),
    "wrong type": (lambda d: ["trainer.max_steps=many"], "max_steps"),
    "missing model": (lambda d: ["model=llama2-7b", f"model.path={d}/no-such-model"], "model.path"),
    "missing data file": (lambda d: ["data=text", f"data.path={d}/missing.txt"], "missing.txt"),
    "empty dataset": (lambda d: ["data=text", f"data.path={write(d, 'empty.txt', '')}"], "empty"),
    "malformed jsonl": (
        lambda d: ["data=jsonl", "data.path=" + write(d, "bad.jsonl", BAD_JSONL)],
        "bad.jsonl:2",
    ),
    "sft on plain text": (lambda d: ["mode=sft"], "mode=sft"),
    "seq_len too long": (lambda d: ["trainer.seq_len=4096"], "trainer.seq_len=4096"),
    "invalid value": (lambda d: ["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
    "omission rate of 1": (lambda d: ["scheduler.rate=1.0"], "scheduler.rate=1.0"),
    "ladder parts exceed the run": (
        lambda d: ["scheduler.sparse_fraction=0.8", "scheduler.dense_fraction=0.5"], "exceeds the run"
    ),
    "unknown metric": (lambda d: ["metric.name=entropy"], "metric.name"),
    "sparsified layer out of range": (lambda d: ["scheduler.layers=[0,7]"], "scheduler.layers"),
    "sizes that make no model": (lambda d: ["model.num_heads=5"], "these sizes make no model"),
    "tf32 without a GPU": (lambda d: ["trainer.device=cpu", "trainer.precision=tf32"], "trainer.precision=tf32 needs a CUDA"),
    "unknown attention kernel": (lambda d: ["model.attn_implementation=fast"], "model.attn_implementation"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str, capsys, monkeypatch) -> None:
    from tests.cli.test_train import in_process  # the CLI's main() without an interpreter start-up each

    make_args, expected = CASES[case]
    code, out, err = in_process(["train", *TINY, *make_args(tmp_path), "hydra.run.dir=run"], capsys, tmp_path, monkeypatch)
    assert code == 2, (out, err)
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]  # not log lines
    assert len(errors) == 1 and errors[0].startswith("satrun train: error:"), err
    assert expected in errors[0]
    assert not (tmp_path / "run" / "final").exists()


def test_micro_batch_that_does_not_fit_exits_2(satrun, tmp_path: Path) -> None:
    """Under a 6 GiB address-space limit the activations of 512 x 128 tokens through 48 narrow
    layers (over 10 GiB) cannot be allocated (short sequences: the attention's work grows with
    their length, its saved activations do not)."""
    result = satrun("train", *TINY, "model.num_layers=48", "trainer.seq_len=128", "trainer.micro_batch_size=512",
                    "hydra.run.dir=run", memory_limit=6 * 2**30)
    assert result.returncode == 2, (result.stdout, result.stderr[-3000:])
    assert "trainer.micro_batch_size=512" in result.stderr and "does not fit" in result.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_unknown_command_exits_2(satrun) -> None:
    result = satrun("trian")
    assert result.returncode == 2 and "unknown command" in result.stderr


def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("SATRUN_DEBUG", None)
    # Importing and composing, before the training loop and its own handler. At some moments
    # (found at 2-3 s) CPython had already marked the process as killed by SIGINT: status -2.
    for delay in (1.5, 3.0):
        proc = subprocess.Popen([sys.executable, "-m", "satrun", "train", *TINY, f"hydra.run.dir=run{delay}"], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        lines = [line for line in stderr.splitlines() if line.strip()]
        # (on a fast machine the later moment may fall in the loop, whose line names SIGINT too)
        assert proc.returncode == 130 and len(lines) == 1 and "SIGINT" in lines[0], (delay, stderr[-2000:])


def test_ctrl_c_while_torch_imports_is_one_line_and_130(tmp_path: Path) -> None:
    """A cold start spends seconds importing torch; a Ctrl-C then must not crash the exit."""
    import os
    import subprocess
    import sys

    # the timer starts once the entry point is imported (as the console script has it), so that
    # on a loaded machine the signal still lands in satrun's start-up, not in this script's import
    code = ("import signal, threading, os\n"
            "import sys; sys.argv = ['satrun', 'train', 'model=tiny']\n"
            "from satrun.cli.main import entry\n"
            "threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
            "entry()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "SATRUN_DEBUG"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 130 and len(lines) == 1 and "stopped by Ctrl-C" in lines[0], result.stderr[-2000:]


@pytest.mark.parametrize("where", [["model=tinyllama-1.1b", "model.path=some-org/some-model"],
                                   ["data=hub", "data.path=some-org/some-dataset"]])
def test_an_unreachable_hub_fails_at_once_in_one_line(where: list[str], satrun, monkeypatch) -> None:
    """No retries for a minute, no warning per attempt: the hub is asked once, then the cache."""
    import datasets.config
    from huggingface_hub import constants

    from satrun import hub

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test: it goes offline
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_checked", {})
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # behind a proxy the hub is not probed (tests/test_hub.py)
    result = satrun("train", *TINY, *where, "hydra.run.dir=run")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert len(errors) == 1 and "http://127.0.0.1:9 cannot be reached" in errors[0], result.stderr[-2000:]
    assert "Retrying" not in result.stdout + result.stderr
