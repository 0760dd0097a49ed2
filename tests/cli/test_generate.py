"""`satrun generate`: text from a run's final/ model (or checkpoint), prompts from the command
line or a file, greedy output equal to transformers' own generate."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.cli.conftest import TINY


def test_generate_from_a_run_equals_transformers_greedy(satrun, tmp_path: Path) -> None:
    run = satrun("train", *TINY, "trainer.max_steps=2", "trainer.save_every=1", "hydra.run.dir=run")
    assert run.returncode == 0, run.stderr
    (tmp_path / "prompts.txt").write_text("In the beginning\n\nAnd God said\n", encoding="utf-8")
    result = satrun("generate", "generate.run=run", "generate.prompt_file=prompts.txt", "generate.max_new_tokens=6",
                    "generate.chat=off", "hydra.run.dir=gen")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["In the beginning", "And God said"]
    assert ">>> And God said" in result.stdout

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    for record in records:
        ids = tokenizer(record["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        assert record["output"] == tokenizer.decode(new, skip_special_tokens=True)
        assert record["new_tokens"] == len(new) <= 6

    from satrun.inference import weights_from  # a checkpoint is a model folder too

    assert weights_from(str(tmp_path / "run" / "checkpoints" / "step_1"), "generate.run") == tmp_path / "run" / "checkpoints" / "step_1"
    assert weights_from(str(tmp_path / "run"), "generate.run") == tmp_path / "run" / "final"


def test_generate_refuses_what_it_cannot_use_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    from tests.cli.test_train import in_process

    for args, says in ((["generate.run=nowhere"], "no final/ model, checkpoint"),
                       (["generate.prompt_file=missing.txt"], "no such file"),
                       (["generate.temperature=-1"], "generate.temperature")):
        code, _, err = in_process(["generate", *TINY, *args, "hydra.run.dir=gen"], capsys, tmp_path, monkeypatch)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and says in lines[0], err
