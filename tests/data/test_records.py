"""Records the mode cannot train on stop the run in one line naming file:line and field, or are
skipped and counted with data.skip_invalid; ShareGPT chats are read as role/content chats."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from satrun.config import DataConfig
from satrun.data.sources import load_raw
from satrun.errors import UsageError

GOOD = {"prompt": "Hi", "response": "Hello there"}


def jsonl(tmp_path: Path, *rows: object) -> DataConfig:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return DataConfig(name="jsonl", format="jsonl", path=str(path))


@pytest.mark.parametrize("bad, says", [
    ({"prompt": "Hi", "response": None}, "field 'response' is null"),
    ({"prompt": None, "response": "Hello"}, "field 'prompt' is null"),
    ({"prompt": "Hi", "response": ""}, "field 'response' is empty"),
    ({"prompt": "Hi", "response": "   "}, "field 'response' is empty"),
    ({"prompt": "Hi", "response": 5}, "field 'response' is the number 5"),
    ({"prompt": ["Hi"], "response": "Hello"}, "field 'prompt' is a list"),
])
def test_sft_pairs_with_unusable_fields_name_file_line_and_field(tmp_path: Path, bad: dict, says: str) -> None:
    cfg = jsonl(tmp_path, GOOD, GOOD, bad, GOOD)
    with pytest.raises(UsageError) as info:
        load_raw(cfg, "sft")
    assert str(info.value).startswith(f"{cfg.path}:3: {says}") and "data.skip_invalid=true" in str(info.value)


@pytest.mark.parametrize("bad, says", [
    ({"messages": "Hi there"}, "field 'messages' is 'Hi there', not a list"),
    ({"messages": []}, "field 'messages' is an empty list; a chat needs a turn"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]}, "messages[1] has content null"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0] has role 'robot'"),
    ({"messages": ["Hi"]}, "messages[0] is 'Hi', not a"),
])
def test_malformed_chats_are_one_line(tmp_path: Path, bad: dict, says: str) -> None:
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    cfg = jsonl(tmp_path, good, bad)
    cfg.schema = "messages"
    with pytest.raises(UsageError) as info:
        load_raw(cfg, "sft")
    assert str(info.value).startswith(f"{cfg.path}:2: ") and says in str(info.value)


def test_sharegpt_from_value_chats_become_role_content(tmp_path: Path) -> None:
    chat = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    cfg = jsonl(tmp_path, {"conversations": chat}, {"conversations": chat})
    cfg.schema, cfg.messages_field = "messages", "conversations"
    rows = load_raw(cfg, "sft")
    assert rows[0]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello"}]


def test_cpt_text_that_is_not_text_is_refused(tmp_path: Path) -> None:
    cfg = jsonl(tmp_path, {"text": "a document"}, {"text": 5})
    with pytest.raises(UsageError, match=r"data.jsonl:2: field 'text' is the number 5, not text"):
        load_raw(cfg, "cpt")


def test_skip_invalid_leaves_them_out_and_says_how_many(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = jsonl(tmp_path, GOOD, {"prompt": "Hi", "response": None}, GOOD, {"prompt": "", "response": "x"}, GOOD)
    cfg.skip_invalid = True
    with caplog.at_level(logging.WARNING, logger="satrun"):
        rows = load_raw(cfg, "sft")
    assert len(rows) == 3 and all(r["messages"][1]["content"] == "Hello there" for r in rows)
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 2 of 5 records" in warnings[0] and f"{cfg.path}:2" in warnings[0]


def test_parquet_rows_are_named_by_number(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list([GOOD, {"prompt": "Hi", "response": None}]).to_parquet(str(path))
    with pytest.raises(UsageError, match=r"pairs.parquet row 2: field 'response' is null"):
        load_raw(DataConfig(name="parquet", format="parquet", path=str(path)), "sft")
