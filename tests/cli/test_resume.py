"""Runs that survive: exact resume, SIGTERM, kill -9 during a save, a non-finite loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.conftest import TINY, read_jsonl, run_in_process

# 12 steps of the default ladder: sparse steps 0-5, ladder 6-9, dense 10-11; checkpoints at 5 and 10.
SHORT = [*TINY, "trainer.max_steps=12", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=5",
         "trainer.keep_checkpoints=3"]  # steps 5, 10 and the last, 12


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"}


def _final_eval(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["eval_loss"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``short_run(scheduler)``: the uninterrupted SHORT run of that scheduler, trained once for
    the module (tests read it, or copy it before damaging it)."""
    root, made = tmp_path_factory.mktemp("short"), {}

    def run(scheduler: str) -> Path:
        if scheduler not in made:
            assert run_in_process(["train", *SHORT, f"scheduler={scheduler}", f"hydra.run.dir={scheduler}"], root).returncode == 0
            made[scheduler] = root / scheduler
        return made[scheduler]

    return run


@pytest.mark.parametrize("scheduler", ["dense", "ladder"])
def test_resumed_run_repeats_the_uninterrupted_losses_exactly(satrun, tmp_path: Path, short_run, scheduler: str) -> None:
    full = short_run(scheduler)
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step_10", "step_12", "step_5"]
    resumed = satrun("train", *SHORT, f"scheduler={scheduler}", f"resume={full}/checkpoints/step_5", "hydra.run.dir=resumed")
    assert resumed.returncode == 0, resumed.stderr
    full_losses, resumed_losses = _losses(full), _losses(tmp_path / "resumed")
    assert sorted(resumed_losses) == list(range(6, 13))  # from the step after the checkpoint, no replay
    assert all(resumed_losses[s] == full_losses[s] for s in resumed_losses)  # bit for bit
    assert _final_eval(tmp_path / "resumed") == _final_eval(full)
    if scheduler == "ladder":  # the resumed part crossed from the sparse stage into the ladder
        stages = {r["stage"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if r["kind"] == "train"}
        assert {"sparse", "dense"} <= stages and len(stages) >= 4


@pytest.mark.parametrize("omit", ["forward", "backward"])
def test_packed_sft_with_token_aware_sat_resumes_bit_exactly(satrun, tmp_path: Path, omit: str) -> None:
    sft = [*SHORT, "mode=sft", "data=chatterbot", "trainer.seq_len=128", f"scheduler.omit={omit}"]
    full = satrun("train", *sft, "hydra.run.dir=full")
    assert full.returncode == 0, full.stderr
    resumed = satrun("train", *sft, "resume=full/checkpoints/step_5", "hydra.run.dir=resumed")
    assert resumed.returncode == 0, resumed.stderr
    full_losses, resumed_losses = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(resumed_losses) == list(range(6, 13))
    assert all(resumed_losses[s] == full_losses[s] for s in resumed_losses)  # bit for bit
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("full", "resumed")]
    assert summaries[0]["train_flops"] == summaries[1]["train_flops"] > 0  # counted on, not restarted
    assert summaries[0]["padding_share"] == summaries[1]["padding_share"]
    assert _final_eval(tmp_path / "resumed") == _final_eval(tmp_path / "full")


def test_damaged_checkpoints_are_told_apart_and_auto_takes_the_newest_intact(satrun, tmp_path: Path, short_run) -> None:
    import shutil

    shutil.copytree(short_run("dense"), tmp_path / "run")  # a copy: this test damages it
    steps = tmp_path / "run" / "checkpoints"
    assert json.loads((steps / "step_12" / "manifest.json").read_text())["files"]["training_state.pt"] > 0
    weights = steps / "step_12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    named = satrun("train", *SHORT, "scheduler=dense", "resume=run/checkpoints/step_12", "hydra.run.dir=other")
    errors = [line for line in named.stderr.splitlines() if line.strip()]
    assert named.returncode == 2 and len(errors) == 1, named.stderr
    assert "step_12 is damaged: model.safetensors has 1000 bytes of the" in errors[0]
    shutil.rmtree(tmp_path / "run" / "final")  # as if killed before the end
    (tmp_path / "run" / "summary.json").unlink()
    auto = satrun("train", *SHORT, "scheduler=dense", "resume=auto", "hydra.run.dir=run")
    assert auto.returncode == 0, auto.stderr
    assert "resume=auto: skipping" in auto.stdout + auto.stderr and "step_12" in auto.stdout + auto.stderr
    assert "resuming from" in auto.stdout + auto.stderr and "step_10" in auto.stdout + auto.stderr
    state = steps / "step_10" / "training_state.pt"  # damaged in a way sizes cannot tell (no manifest)
    (steps / "step_10" / "manifest.json").unlink()
    state.write_bytes(b"\0" * state.stat().st_size)
    unreadable = satrun("train", *SHORT, "scheduler=dense", "resume=run/checkpoints/step_10", "hydra.run.dir=third")
    assert unreadable.returncode == 2 and "training_state.pt cannot be read" in unreadable.stderr
    assert len([line for line in unreadable.stderr.splitlines() if line.strip()]) == 1


def test_resume_of_a_path_without_checkpoints_is_a_usage_error(satrun, tmp_path: Path) -> None:
    result = satrun("train", *TINY, f"resume={tmp_path}")
    assert result.returncode == 2 and "no checkpoint" in result.stderr


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("SATRUN_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "satrun", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


LONG = [*TINY, "trainer.max_steps=60", "trainer.log_every=1", "trainer.eval_every=0"]


@pytest.fixture(scope="module")
def long_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted LONG run, which the interrupted ones are compared with (read only)."""
    root = tmp_path_factory.mktemp("long")
    assert run_in_process(["train", *LONG, "hydra.run.dir=full"], root).returncode == 0
    return root / "full"


def test_sigterm_saves_and_the_resumed_run_ends_like_an_uninterrupted_one(satrun, tmp_path: Path, long_full: Path) -> None:
    proc = _start([*LONG, "hydra.run.dir=run"], tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(_losses(tmp_path / "run")) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "SIGTERM" in stderr and "resume=" in stderr and not (tmp_path / "run" / "final").exists()
    stopped_at = max(_losses(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped_at}").is_dir()

    hint = stderr.strip().splitlines()[-1].split("continue in this folder with: ")[1]
    import shlex

    command = shlex.split(hint)
    assert command[:2] == ["satrun", "train"] and f"hydra.run.dir={tmp_path / 'run'}" in command
    resumed = satrun(*command[1:])  # the printed command, as given
    assert resumed.returncode == 0, resumed.stderr
    assert _final_eval(tmp_path / "run") == _final_eval(long_full)
    assert _losses(tmp_path / "run") == _losses(long_full)  # one record per step, none twice

    again = satrun(*command[1:])  # the run has finished: nothing is retrained
    assert again.returncode == 0 and "already finished (60 steps); nothing to do" in again.stdout + again.stderr
    assert _losses(tmp_path / "run") == _losses(long_full)
    longer = satrun("train", *LONG, "trainer.max_steps=80", "resume=run/checkpoints/step_" + str(stopped_at),
                    "hydra.run.dir=longer")
    assert longer.returncode == 2 and "trainer.max_steps=60 -> 80" in longer.stderr and "resume_allow_changes" in longer.stderr


def test_kill_9_during_a_save_keeps_the_previous_checkpoint_usable(satrun, tmp_path: Path, long_full: Path) -> None:
    args = [*LONG, "trainer.save_every=1", "trainer.keep_checkpoints=0"]
    proc = _start([*args, "hydra.run.dir=run"], tmp_path)
    folder = tmp_path / "run" / "checkpoints"

    def saving_after_a_complete_one() -> bool:
        names = [p.name for p in folder.iterdir()] if folder.exists() else []
        return any(n.startswith("step_") for n in names) and any(n.startswith(".step_") for n in names)

    _wait_for(saving_after_a_complete_one, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert any(p.name.startswith(".step_") for p in folder.iterdir())  # killed mid-save
    resumed = satrun("train", *args, "resume=auto", "trainer.save_every=0", "hydra.run.dir=run")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert _final_eval(tmp_path / "run") == _final_eval(long_full)


def test_a_non_finite_loss_stops_the_run_naming_the_step(satrun, tmp_path: Path) -> None:
    # lr 1e30: the first updates blow the weights up until the loss is no longer finite.
    result = satrun("train", *TINY, "optim.lr=1e30", "optim.warmup_steps=0", "trainer.save_every=1",
                    "trainer.log_every=1", "hydra.run.dir=run")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss or gradient at step" in line and "last checkpoint" in line
    step = int(line.split("at step ")[1].split()[0])
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1].name == f"step_{step - 1}"  # nothing saved after the bad step
    assert not (tmp_path / "run" / "final").exists()


def test_non_finite_steps_may_be_skipped_up_to_a_bound(satrun, tmp_path: Path) -> None:
    result = satrun("train", *TINY, "optim.lr=1e30", "optim.warmup_steps=0", "trainer.max_skips=3", "hydra.run.dir=run")
    assert result.returncode == 1 and "4 such steps exceed trainer.max_skips=3" in result.stderr


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 50 MB file system (tmpfs; needs the right to mount, else the test is skipped)."""
    yield from _mounted(tmp_path / "disk", "50m")


def _mounted(disk: Path, size: str):  # type: ignore[no-untyped-def]
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("when", ["checkpoint", "final"])
def test_a_full_disk_is_one_line_naming_the_last_intact_checkpoint(satrun, tmp_path: Path, small_disk: Path,
                                                                   when: str) -> None:
    # the tiny model's checkpoint takes about 40 MB: one fits, a second (or final/ beside it) does not
    # final: the last step (12) is checkpointed before final/ is written, and final/ no longer fits beside it
    save = ["trainer.save_every=5"] if when == "checkpoint" else ["trainer.save_every=12"]
    result = satrun("train", *SHORT, *save, f"hydra.run.dir={small_disk / 'run'}")
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "no space left on the device" in errors[0] and "last intact checkpoint" in errors[0]
    kept = small_disk / "run" / "checkpoints" / ("step_5" if when == "checkpoint" else "step_12")
    assert str(kept) in errors[0] and (kept / "manifest.json").is_file()
    if when == "final":
        assert "final/ was not written, no training is lost" in errors[0] and "resume=auto" in errors[0]
    assert not list((small_disk / "run").rglob(".*.tmp-*"))  # nothing half-written left behind


def test_a_last_checkpoint_without_room_still_leaves_the_final_model(satrun, tmp_path: Path) -> None:
    """30 MB: the last step's checkpoint (about 40 MB, with the optimizer) does not fit, final/
    (a third of it) does: a warning, then final/, and the run ends well."""
    for disk in _mounted(tmp_path / "disk", "30m"):
        result = satrun("train", *SHORT, "trainer.save_every=12", f"hydra.run.dir={disk / 'run'}")
        assert result.returncode == 0, result.stderr[-3000:]
        said = result.stdout + result.stderr
        assert "warning: no space left on the device" in said and "writing final/ all the same" in said
        assert (disk / "run" / "final" / "model.safetensors").is_file() and not (disk / "run" / "checkpoints" / "step_12").exists()
