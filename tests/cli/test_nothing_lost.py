"""Nothing lost, nothing hidden: a finished run is never written over without being asked, a
refused start leaves its folder byte for byte as it was, dropped data is counted, and every bad
input is one line naming the key or file:line (docs/design.md's table maps each case
to its test here)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

TWO = ["model=tiny", "trainer.seq_len=32", "trainer.max_steps=2", "trainer.eval_batches=1", "trainer.log_every=1"]
SFT = ["model=tiny", "mode=sft", "data=chatterbot", "data.max_examples=60", "trainer.seq_len=96", "trainer.eval_batches=1"]


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) and its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(result, command: str = "train") -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")]  # not log lines
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"satrun {command}: error:"), result.stderr
    return lines[0]


def test_a_second_start_into_a_run_folder_is_refused_and_changes_nothing(satrun, tmp_path: Path) -> None:
    """Case 1: training again into a finished run's folder replaced its final/, summary and
    .hydra and appended to its metrics; now it is refused unless trainer.overwrite=true."""
    assert satrun("train", *TWO, "hydra.run.dir=runs/x").returncode == 0
    before = digest(tmp_path / "runs/x")
    assert {"summary.json", "metrics.jsonl", ".hydra/config.yaml", "main.log"} <= before.keys()
    error = one_error(satrun("train", *TWO, "hydra.run.dir=runs/x", "optim.lr=1e-2", "trainer.seed=7"))
    assert "already holds a run" in error and "resume=auto" in error and "trainer.overwrite=true" in error
    assert digest(tmp_path / "runs/x") == before
    replaced = satrun("train", *TWO, "hydra.run.dir=runs/x", "optim.lr=1e-2", "trainer.overwrite=true")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "runs/x/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2]  # one run's curve, not two
    assert "optim.lr=1e-2" in (tmp_path / "runs/x/.hydra/overrides.yaml").read_text()


def test_resume_auto_never_retrains_a_finished_run_without_a_checkpoint(satrun, tmp_path: Path) -> None:
    """Case 2: resume=auto on a finished run saved without checkpoints, with more steps, retrained
    it from step 0 over its final/; now it is refused, and with the same steps nothing is done."""
    assert satrun("train", *SFT, "trainer.max_steps=2", "hydra.run.dir=runs/r").returncode == 0
    before = digest(tmp_path / "runs/r")
    error = one_error(satrun("train", *SFT, "trainer.max_steps=4", "resume=auto", "hydra.run.dir=runs/r"))
    assert "finished after 2 steps without a checkpoint" in error and "trainer.max_steps=4" in error
    assert digest(tmp_path / "runs/r") == before
    same = satrun("train", *SFT, "trainer.max_steps=2", "resume=auto", "hydra.run.dir=runs/r")
    assert same.returncode == 0 and "nothing to do" in same.stderr + same.stdout
    assert digest(tmp_path / "runs/r") == before


def test_a_refused_resume_keeps_the_run_s_own_settings(satrun, tmp_path: Path) -> None:
    """Case 3: a resume refused because its settings differ rewrote .hydra/config.yaml and
    overrides.yaml with the rejected settings."""
    assert satrun("train", *TWO, "trainer.save_every=1", "hydra.run.dir=runs/c").returncode == 0
    before = digest(tmp_path / "runs/c")
    error = one_error(satrun("train", *TWO, "trainer.max_steps=3", "optim.lr=0.5", "resume=auto", "hydra.run.dir=runs/c"))
    assert "settings differ" in error
    assert digest(tmp_path / "runs/c") == before
    # and a refused start into a new folder leaves no folder behind
    one_error(satrun("train", *TWO, "trainer.max_steps=0", "hydra.run.dir=runs/new"))
    assert not (tmp_path / "runs/new").exists()


def test_dropped_chats_are_counted_and_a_run_left_without_data_says_why(satrun, tmp_path: Path) -> None:
    """Case 4: chats whose prompt alone fills trainer.seq_len were dropped without a count."""
    result = satrun("train", *SFT, "trainer.max_steps=1", "trainer.seq_len=36", "data.eval_fraction=0.1", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads((tmp_path / "run/summary.json").read_text())["data"]
    assert counts["unit"] == "chats" and counts["read"] - counts["capped"] == 60 and counts["held_out"] == 6
    assert counts["dropped"] > 0 and counts["truncated"] > 0  # some chats' prompts fill 36 tokens; some answers are cut
    assert counts["used"] + counts["dropped"] == 60
    start = next(line for line in (result.stdout + result.stderr).splitlines() if "data chatterbot" in line)
    assert f"{counts['dropped']} chats dropped" in start and f"{counts['truncated']} chats truncated" in start
    error = one_error(satrun("train", *SFT, "trainer.max_steps=1", "trainer.seq_len=8", "hydra.run.dir=none"))
    assert "60 of 60 chats dropped" in error and "prompt alone fills trainer.seq_len=8" in error


@pytest.mark.parametrize("override, says", [
    ("+optim.learning_rate=0.1", "optim.learning_rate is not a key"),
    ("+adapter.foo=1", "adapter.foo is not a key"),
    ("optim.learning_rate=0.1", "optim.learning_rate is not a key"),
])
def test_unknown_keys_are_errors_with_or_without_plus(satrun, tmp_path: Path, override: str, says: str) -> None:
    """Case 5: +key=value of a key that does not exist trained and ignored it; a plain typo's
    error suggested the + form."""
    error = one_error(satrun("train", *TWO, override, "hydra.run.dir=run"))
    assert says in error and "To append" not in error
    if "learning_rate" in override:
        assert "close: optim.lr" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, line", [("hidden_size: [64\n", 2), ("name: x\n\thidden_size: 64\n", 2)])
def test_malformed_config_yaml_is_one_line_naming_file_and_line(satrun, tmp_path: Path, text: str, line: int) -> None:
    """Case 6: a malformed YAML file under --config-dir ended in a 108-line traceback."""
    (tmp_path / "mine/model").mkdir(parents=True)
    (tmp_path / "mine/model/bad.yaml").write_text(text)
    error = one_error(satrun("train", "--config-dir", "mine", "model=bad"))
    assert f"bad.yaml:{line}: not valid YAML" in error


def test_malformed_task_yaml_is_named_not_skipped(satrun, tmp_path: Path) -> None:
    """Case 7: a task file the harness cannot parse was skipped and its task called unknown."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/mine.yaml").write_text("task: my_task\ndataset_path: [x\n")
    error = one_error(satrun("eval", "model=tiny", "eval.tasks=[my_task]", "eval.include_path=[tasks]"), "eval")
    assert "tasks/mine.yaml:3: not valid YAML" in error and "no task" not in error


def test_config_dir_goes_before_the_overrides_for_every_command(satrun, tmp_path: Path) -> None:
    """Case 8: --config-dir before the overrides broke plan, generate, eval and bench."""
    (tmp_path / "mine/model").mkdir(parents=True)
    (tmp_path / "mine/model/mine.yaml").write_text("defaults:\n  - tiny\n  - _self_\nname: mine\nhidden_size: 32\n")
    plan = satrun("plan", "--config-dir", "mine", "model=mine", "trainer.seq_len=64")
    assert plan.returncode == 0, plan.stderr[-2000:]
    planned = json.loads(next((tmp_path / "outputs/plans").glob("*/plan.json")).read_text())
    assert planned["shape"]["hidden"] == 32
    done = satrun("generate", "--config-dir", "mine", "model=mine", "generate.max_new_tokens=2", "generate.chat=off")
    assert done.returncode == 0, done.stderr[-2000:]
    from satrun.cli.main import _with_overrides

    extra = ["hydra.run.dir=x"]
    assert _with_overrides(["--config-dir", "d", "a=1"], extra) == ["--config-dir", "d", "hydra.run.dir=x", "a=1"]
    assert _with_overrides(["a=1", "--cfg", "job"], extra) == ["hydra.run.dir=x", "a=1", "--cfg", "job"]
    assert _with_overrides(["--info", "a=1"], extra) == ["--info", "hydra.run.dir=x", "a=1"]
    assert _with_overrides(["--info", "config"], extra) == ["--info", "config", "hydra.run.dir=x"]


def test_an_adapter_whose_base_is_gone_names_it(satrun, tmp_path: Path) -> None:
    """Case 9: a final/adapter whose base folder is gone failed with "(OSError)" alone; an
    interrupted random-base LoRA run's checkpoint named a base written only at the end."""
    lora = ["model=tiny", "adapter=lora", "scheduler=dense", "trainer.seq_len=32", "trainer.max_steps=2",
            "trainer.eval_batches=1", "trainer.save_every=1"]
    assert satrun("train", *lora, "hydra.run.dir=run").returncode == 0
    (tmp_path / "run/final").rename(tmp_path / "kept-final")  # as if the run had been stopped before its end
    from_checkpoint = satrun("generate", "generate.run=run/checkpoints/step_2", "generate.max_new_tokens=2",
                             "generate.chat=off", "hydra.run.dir=g1")
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr[-2000:]
    (tmp_path / "run/base").rename(tmp_path / "moved-base")
    error = one_error(satrun("generate", "generate.run=kept-final/adapter", "generate.max_new_tokens=2",
                             "hydra.run.dir=g2"), "generate")
    assert str((tmp_path / "run/base").resolve()) in error and "not there" in error


@pytest.mark.parametrize("overrides, says", [
    (["adapter=lora", "adapter.r=0"], "adapter.r=0 must be at least 1"),
    (["adapter=lora", "adapter.dropout=1.5"], "adapter.dropout=1.5 must be in [0, 1)"),
    (["eval.batch_size=0"], "eval.batch_size=0 must be at least 1"),
    (["eval.limit=-1"], "eval.limit=-1"),
    (["generate.top_p=2"], "generate.top_p=2.0 must be in (0, 1]"),
    (["trainer.compile=maybe"], "trainer.compile=maybe: Value 'maybe' is not a valid bool"),
    (["eval.include_path=/x"], "eval.include_path=/x: expects a list, e.g. eval.include_path=[/x]"),
])
def test_each_bad_value_gets_its_own_line(satrun, tmp_path: Path, overrides: list[str], says: str) -> None:
    """Case 10: the adapter and eval validators had one sentence for every bad key; Hydra's
    "Error merging override" gave no reason."""
    assert says in one_error(satrun("plan", "model=tiny", *overrides), "plan")


@pytest.mark.parametrize("name, content, says", [
    ("blank.jsonl", b"\n\n  \n", "no records, blank lines only"),
    ("blank.txt", b"\n \n\n", "blank lines only"),
    ("latin1.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n', "latin1.jsonl:2: not UTF-8"),
    ("latin1.txt", b"fine\nna\xefve\n", "latin1.txt:2: not UTF-8"),
    ("absent.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "absent.jsonl:2: the record has no field 'response'"),
    ("empty-chat.jsonl", b'{"messages": []}\n', "field 'messages' is an empty list"),
])
def test_data_problems_name_the_line_not_the_library(tmp_path: Path, name: str, content: bytes, says: str) -> None:
    """Case 10 (data): a blank file leaked a datasets error, non-UTF-8 named a byte offset, an
    absent field was "null", an empty chat "is a list, not a list of messages"."""
    from satrun.config import DataConfig
    from satrun.data.sources import load_raw
    from satrun.errors import UsageError

    (tmp_path / name).write_bytes(content)
    fmt = "text" if name.endswith(".txt") else "jsonl"
    cfg = DataConfig(name=fmt, format=fmt, path=str(tmp_path / name), schema="messages" if "chat" in name else "pairs")
    with pytest.raises(UsageError) as info:
        load_raw(cfg, "cpt" if fmt == "text" else "sft")
    assert says in str(info.value) and "\n" not in str(info.value)


def test_top_level_help_lists_every_group(satrun) -> None:
    """Case 11: satrun --help left out the adapter and calibration groups."""
    from satrun.cli.configs import config_dir

    shown = satrun("--help").stdout
    groups = sorted(p.name for p in config_dir().iterdir() if p.is_dir())
    assert groups and all(f"\n  {group} " in shown for group in groups), shown
