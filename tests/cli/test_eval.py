"""`satrun eval` and ``trainer.benchmark_every``: lm-evaluation-harness on a model in memory,
offline, with satrun's own tasks and the user's; benchmark records during training; report
columns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.cli.conftest import TINY, read_jsonl

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

USER_TASK = """task: my_yes_no
dataset_path: json
dataset_kwargs:
  data_files: {data}
output_type: multiple_choice
test_split: train
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["yes", "no"]
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_eval_scores_a_run_offline_with_the_harness_results(satrun, tmp_path: Path, monkeypatch) -> None:
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    assert satrun("train", *TINY, "trainer.max_steps=2", "hydra.run.dir=run").returncode == 0
    result = satrun("eval", "eval.run=run", "eval.limit=16", "trainer.device=cpu", "hydra.run.dir=ev")
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / "ev" / "eval.json").read_text())
    for key in ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better"):  # the harness's structure
        assert key in found, key
    for task in ("bible_cloze", "chatterbot_mc"):
        assert found["n-samples"][task]["effective"] == 16
        assert 0.0 <= found["results"][task]["acc,none"] <= 1.0
        assert found["satrun"]["scores"][f"{task}/acc"] == found["results"][task]["acc,none"]
        assert task in result.stdout  # the table
    assert found["satrun"]["model"].endswith("final")
    assert (tmp_path / "ev" / "eval.md").read_text().startswith("|")

    # the user's own task folder, over a local file
    (tmp_path / "tasks").mkdir()
    data = tmp_path / "tasks" / "yes_no.jsonl"
    data.write_text("".join(json.dumps({"question": f"Is {n} even?", "label": n % 2}) + "\n" for n in range(6)))
    (tmp_path / "tasks" / "my_yes_no.yaml").write_text(USER_TASK.format(data=data))
    mine = satrun("eval", "eval.run=run", "eval.tasks=[my_yes_no]", "eval.include_path=[tasks]", "eval.num_fewshot=2",
                  "hydra.run.dir=mine")
    assert mine.returncode == 0, mine.stderr
    theirs = json.loads((tmp_path / "mine" / "eval.json").read_text())
    assert theirs["n-samples"]["my_yes_no"]["effective"] == 6 and theirs["n-shot"]["my_yes_no"] == 2

    report = satrun("report", "ev", "mine", "--out", "cmp")
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((tmp_path / "cmp" / "sweep_summary.csv").open()))
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert float(rows[0]["benchmark:bible_cloze/acc"]) == found["results"]["bible_cloze"]["acc,none"]
    assert rows[1]["benchmark:my_yes_no/acc"] != "" and rows[1]["benchmark:bible_cloze/acc"] == ""


def test_an_unknown_task_is_one_line_and_status_2(satrun, tmp_path: Path) -> None:
    result = satrun("eval", "model=tiny", "eval.tasks=[bible_clozee]", "hydra.run.dir=ev")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no task 'bible_clozee'" in lines[0] and "bible_cloze" in lines[0], result.stderr
    assert not (tmp_path / "ev" / "eval.json").exists()


def test_benchmark_records_of_a_cpt_run_reach_metrics_summary_and_report(satrun, tmp_path: Path) -> None:
    """Records at the start, every N steps and at the end, in metrics.jsonl, the summary, the
    end-of-run table and the report (tests/evaluation/test_harness.py: the model is scored
    dense and the random state is kept)."""
    args = [*TINY, "trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=0"]
    result = satrun("train", *args, "trainer.benchmark_every=2", "eval.tasks=[bible_cloze]", "eval.limit=8",
                    "hydra.run.dir=bench")
    assert result.returncode == 0, result.stderr
    records = read_jsonl(tmp_path / "bench" / "metrics.jsonl")
    benchmarks = [r for r in records if r["kind"] == "benchmark"]
    assert [r["step"] for r in benchmarks] == [0, 2, 3]
    assert all(set(r) == {"kind", "step", "bible_cloze/acc", "bible_cloze/acc_norm"} for r in benchmarks)
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert summary["benchmark"] == {k: v for k, v in benchmarks[-1].items() if k not in ("kind", "step")}
    assert summary["initial_benchmark"]["bible_cloze/acc"] == benchmarks[0]["bible_cloze/acc"]
    assert "benchmark bible_cloze/acc" in result.stdout  # the end-of-run table
    assert satrun("report", "bench", "--out", "cmp").returncode == 0
    rows = list(csv.DictReader((tmp_path / "cmp" / "sweep_summary.csv").open()))
    assert float(rows[0]["benchmark:bible_cloze/acc"]) == benchmarks[-1]["bible_cloze/acc"]
