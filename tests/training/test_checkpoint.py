"""Checkpoint folders: complete or absent, newest by step number, the last K kept."""

from __future__ import annotations

from pathlib import Path

import torch

from satrun.training import checkpoint


def _write_model(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "model.safetensors").chmod(0o600)  # as transformers' save leaves it (a temporary file renamed)


MODEL = torch.nn.Linear(2, 2)
OPTIMIZER = torch.optim.SGD(MODEL.parameters(), lr=0.1)


def save(folder: Path, step: int, write_model, state: dict, keep: int) -> Path:  # type: ignore[no-untyped-def]
    return checkpoint.save_checkpoint(folder, step, MODEL, OPTIMIZER, state, write_model, keep)


def state_of(folder: Path) -> dict:
    """The loop's own part of a checkpoint's training state."""
    state = checkpoint.load_state(folder)
    assert state.pop("optimizer") == OPTIMIZER.state_dict() and state.pop("sharded") is False
    assert state.pop("folder") == str(folder)
    return state


def test_checkpoints_are_found_in_step_order_and_pruned(tmp_path: Path) -> None:
    for step in (9, 10, 2):
        save(tmp_path, step, _write_model, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.checkpoints_in(tmp_path)] == ["step_9", "step_10"]
    assert state_of(tmp_path / "step_10") == {"step": 10}
    assert (tmp_path / "step_10" / "model.safetensors").read_bytes() == b"weights"


def test_a_failed_save_leaves_the_previous_checkpoints_alone(tmp_path: Path) -> None:
    save(tmp_path, 1, _write_model, {"step": 1}, keep=0)

    def crash(folder: Path) -> None:
        _write_model(folder)
        raise OSError("disk full")

    try:
        save(tmp_path, 2, crash, {"step": 2}, keep=0)
    except OSError:
        pass
    assert [p.name for p in checkpoint.checkpoints_in(tmp_path)] == ["step_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]


def test_incomplete_folders_do_not_count(tmp_path: Path) -> None:
    (tmp_path / "step_5").mkdir()  # no training state: e.g. copied by hand, half-way
    (tmp_path / ".step_6.tmp-abc").mkdir()  # staging folder of a killed save
    save(tmp_path, 3, None, {}, keep=0)
    assert [p.name for p in checkpoint.checkpoints_in(tmp_path)] == ["step_3"]
    assert not (tmp_path / ".step_6.tmp-abc").exists()  # the next save cleans up


def test_rng_state_round_trips() -> None:
    state = checkpoint.rng_state()
    first = torch.rand(3)
    checkpoint.restore_rng(state)
    assert torch.equal(torch.rand(3), first)


def test_saving_a_step_again_replaces_it_whole(tmp_path: Path) -> None:
    save(tmp_path, 4, _write_model, {"run": 1}, keep=0)
    save(tmp_path, 4, None, {"run": 2}, keep=0)
    assert state_of(tmp_path / "step_4") == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4"]  # no old copy, no staging left
    assert not (tmp_path / "step_4" / "model.safetensors").exists()


def test_written_folders_follow_the_umask(tmp_path: Path) -> None:
    import os

    previous = os.umask(0o027)
    try:
        folder = save(tmp_path, 1, _write_model, {"run": 1}, keep=0)
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o750  # not mkdtemp's private 0700
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_report_skips_a_torn_last_line(tmp_path: Path) -> None:
    from satrun.report import curves

    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.5}\n{"kind": "tra', encoding="utf-8")
    assert curves(tmp_path) == {"train": [(1, 2.5)], "eval": []}


def test_a_shared_folder_keeps_what_another_process_finished_first(tmp_path: Path) -> None:
    """The packaged model's conversion into the user's cache: two runs may convert at once."""
    from satrun.training.saving import staged_folder

    others = tmp_path / ".model.tmp-other"  # another process still writing
    others.mkdir()
    with staged_folder(tmp_path / "model", shared=True) as staging:
        (staging / "weights").write_text("ours")
        (tmp_path / "model").mkdir()  # the other process renames its folder in first
        (tmp_path / "model" / "weights").write_text("theirs")
    assert (tmp_path / "model" / "weights").read_text() == "theirs"
    assert others.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-other", "model"]
    with staged_folder(tmp_path / "fresh", shared=True) as staging:
        (staging / "weights").write_text("ours")
    assert (tmp_path / "fresh" / "weights").read_text() == "ours"
