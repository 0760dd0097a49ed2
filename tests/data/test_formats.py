"""The SFT record schemas users bring (data.schema: pairs, alpaca, prompt_completion with text or
messages, messages), system prompts (data.system_field, data.system_prompt) and
mode.train_on_inputs: fixture files render to the expected chats and label masks, and a bad
record is one line naming its file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from satrun.config import DataConfig
from satrun.data.sft import tokenize_chat
from satrun.data.sources import load_raw
from satrun.errors import UsageError
from satrun.labels import IGNORE

FIXTURES = Path(__file__).parent / "fixtures" / "sft"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


CASES = {
    "pairs": ({"prompt_field": "question", "response_field": "answer", "system_field": "persona",
               "system_prompt": "You are helpful."}, [
        [system("You answer in one line."), user("What is a psalm?"), assistant("A sacred song.")],
        [system("You are helpful."), user("Who wrote Genesis?"), assistant("Tradition names Moses.")],  # null: the fixed one
    ]),
    "alpaca": ({"schema": "alpaca"}, [
        [user("Name the first book of the Bible."), assistant("Genesis.")],  # an empty input adds nothing
        [user("Translate into French.\n\nIn the beginning"), assistant("Au commencement")],
        [user("Count the gospels."), assistant("Four.")],  # no input field at all
    ]),
    "prompt_completion": ({"schema": "prompt_completion"}, [
        [user("Say hello."), assistant("Hello!")],
        [user("Say goodbye."), assistant("Goodbye!")],
    ]),
    "prompt_completion_messages": ({"schema": "prompt_completion", "system_prompt": "Be kind."}, [
        [system("Be terse."), user("Capital of France?"), assistant("Paris.")],  # its own system turn wins
        [system("Be kind."), user("Two plus two?"), assistant("Four.")],
    ]),
    "messages": ({"schema": "messages"}, [
        [user("Hi"), assistant("Hello."), user("Bye"), assistant("Farewell.")],
        [system("Speak like a sailor."), user("Hi"), assistant("Ahoy.")],
    ]),
}


def config(name: str, **settings) -> DataConfig:
    return DataConfig(name="jsonl", format="jsonl", path=str(FIXTURES / f"{name}.jsonl"), **settings)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_schema_renders_to_the_expected_chats_and_label_masks(name: str, tokenizer) -> None:
    settings, chats = CASES[name]
    rows = load_raw(config(name, **settings), "sft")
    assert [row["messages"] for row in rows] == chats
    for chat in chats:
        tokens = tokenize_chat(tokenizer, chat, seq_len=512)
        ids, labels = tokens["input_ids"], tokens["labels"]
        trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
        answers = [m["content"] for m in chat if m["role"] == "assistant"]
        assert trained == "".join(f"{a}<|im_end|>\n" for a in answers)  # the answers and their end markers only
        everything = tokenize_chat(tokenizer, chat, seq_len=512, train_on_inputs=True)
        assert everything["input_ids"] == ids and everything["labels"] == ids  # train_on_inputs: every token
        assert sum(label == IGNORE for label in labels) > 0


BAD = [
    ("alpaca", {"instruction": "Do it.", "input": 3, "output": "Done."}, "field 'input' is the number 3, not text"),
    ("alpaca", {"instruction": "", "output": "Done."}, "field 'instruction' is empty"),
    ("prompt_completion", {"prompt": "Hi", "completion": [{"role": "user", "content": "Hi"}]},
     "field 'completion' has no assistant turn"),
    ("prompt_completion", {"prompt": "Hi", "completion": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}]},
     "field 'completion' holds a turn that is not the assistant's"),
    ("prompt_completion", {"prompt": [{"role": "robot", "content": "Hi"}], "completion": "Hello"}, "prompt[0] has role 'robot'"),
    ("pairs", {"prompt": "Hi", "response": "Hello", "persona": 7}, "field 'persona' is the number 7, not text"),
]


@pytest.mark.parametrize("schema, bad, says", BAD)
def test_a_bad_record_names_its_file_and_line(schema: str, bad: dict, says: str, tmp_path: Path) -> None:
    good = {"pairs": {"prompt": "Hi", "response": "Hello"}, "alpaca": {"instruction": "Hi", "output": "Hello"},
            "prompt_completion": {"prompt": "Hi", "completion": "Hello"}}[schema]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in (good, good, bad)), encoding="utf-8")
    cfg = DataConfig(name="jsonl", format="jsonl", path=str(path), schema=schema,
                     system_field="persona" if schema == "pairs" else None)
    with pytest.raises(UsageError) as info:
        load_raw(cfg, "sft")
    assert str(info.value).startswith(f"{path}:3: {says}"), str(info.value)


def test_the_packaged_chats_take_a_system_prompt() -> None:
    rows = load_raw(DataConfig(name="chatterbot", format="chatterbot", system_prompt="Be brief.", max_examples=3), "sft")
    assert all(row["messages"][0] == system("Be brief.") and row["messages"][1]["role"] == "user" for row in rows)
