"""SFT data: prompt masking, truncation, corpus building from files and the packaged chats, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
import torch

from satrun.config import DataConfig
from satrun.data import build_corpus
from satrun.data.sft import render, tokenize_chat, tokenize_chats
from satrun.labels import IGNORE
from satrun.errors import UsageError

TWO_TURN = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
MULTI_TURN = [
    {"role": "user", "content": "Name a prime number larger than ten."},
    {"role": "assistant", "content": "Thirteen is a prime number."},
    {"role": "user", "content": "And one larger than twenty?"},
    {"role": "assistant", "content": "Twenty-three, for example."},
]
CHATS = {"two-turn": TWO_TURN, "multi-turn": MULTI_TURN}
TOKENIZERS = ["tokenizer", "plain_tokenizer"]


def _answer_text(tok, content: str) -> str:
    """What the answer piece of an assistant turn is, as text, for each rendering."""
    if tok.chat_template:  # SmolLM2's template: "<|im_start|>assistant\n" + content + "<|im_end|>\n"
        return content + "<|im_end|>\n"
    return " " + content + tok.eos_token + "\n"  # plain: "Assistant:" + " " + content + EOS + "\n"


def _labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("chat", list(CHATS))
def test_only_assistant_answers_carry_labels(request, tok_name, chat):
    tok = request.getfixturevalue(tok_name)
    messages = CHATS[chat]
    out = tokenize_chat(tok, messages, seq_len=10_000)
    ids, labels = out["input_ids"], out["labels"]

    assert len(ids) == len(labels) > 0
    assert labels[0] == IGNORE
    assert all(lab == IGNORE or lab == i for i, lab in zip(ids, labels))
    # The tokens are the whole rendered chat, nothing more or less.
    assert tok.decode(ids) == render(tok, messages, generation_prompt=False)

    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _labelled_runs(ids, labels)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        expected = _answer_text(tok, answer)
        assert tok.decode(run) == expected
        assert run == tok(expected, add_special_tokens=False).input_ids
    assert sum(len(r) for r in runs) == sum(lab != IGNORE for lab in labels)

    prompt_text = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
    for m in messages:
        if m["role"] == "user":
            assert m["content"] in prompt_text
        else:
            assert m["content"] not in prompt_text
    # The end-of-turn closing each answer is learnt, so the model learns to stop.
    assert all(tok.eos_token_id in run for run in runs)


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_truncation_keeps_labels_aligned(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    full = tokenize_chat(tok, MULTI_TURN, seq_len=10_000)
    n = len(full["input_ids"])
    first_label = next(k for k, lab in enumerate(full["labels"]) if lab != IGNORE)
    for seq_len in sorted({1, first_label, first_label + 2, n // 2, n - 1, n, n + 7}):
        out = tokenize_chat(tok, MULTI_TURN, seq_len=seq_len)
        assert len(out["input_ids"]) == len(out["labels"]) == min(seq_len, n)
        assert out["input_ids"] == full["input_ids"][:seq_len]
        assert out["labels"] == full["labels"][:seq_len]
        assert all(lab == IGNORE or lab == i for i, lab in zip(out["input_ids"], out["labels"]))


def test_tokenize_chats_drops_chats_truncated_to_prompt_only(tokenizer):
    ds = datasets.Dataset.from_dict({"messages": [TWO_TURN, MULTI_TURN]})
    first_label = next(k for k, lab in enumerate(tokenize_chat(tokenizer, TWO_TURN, 10_000)["labels"]) if lab != IGNORE)
    kept, counts = tokenize_chats(ds, tokenizer, 10_000, fingerprint="test-sft-chats-all-" + str(first_label))
    assert len(kept) == 2 and (counts.chats, counts.truncated, counts.dropped) == (2, 0, 0)
    assert kept[1]["input_ids"] == tokenize_chat(tokenizer, MULTI_TURN, 10_000)["input_ids"]
    none, counts = tokenize_chats(ds, tokenizer, first_label, fingerprint="test-sft-chats-none-" + str(first_label))
    assert len(none) == 0 and (counts.chats, counts.truncated, counts.dropped) == (2, 0, 2)
    one, counts = tokenize_chats(ds, tokenizer, first_label + 1, fingerprint="test-sft-chats-one-" + str(first_label))
    assert len(one) >= 1 and counts.dropped == 2 - len(one) and counts.truncated == len(one)  # every kept chat is cut
    assert all(any(lab != IGNORE for lab in row["labels"]) for row in one)


def test_non_incremental_chat_template_is_a_usage_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(UsageError, match="incrementally"):
        tokenize_chat(tok, MULTI_TURN, seq_len=10_000)


def _check_sft_examples(corpus, tokenizer, seq_len: int) -> None:
    assert corpus.train and corpus.eval
    assert corpus.pad_id == tokenizer.pad_token_id
    for ids, labels in corpus.train + corpus.eval:
        assert ids.dtype == labels.dtype == torch.long
        assert ids.shape == labels.shape and 0 < ids.numel() <= seq_len
        labelled = labels != IGNORE
        assert bool(labelled.any()), "an example without any labelled token"
        assert not bool(labelled[0]), "the first token is labelled"
        assert torch.equal(labels[labelled], ids[labelled])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


PAIRS = [(f"Question number {i}: what is {i} plus {i}?", f"The answer is {2 * i}, sum number {i}.") for i in range(12)]


def test_build_corpus_sft_jsonl_prompt_response(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, [{"prompt": p, "response": r, "other": 1} for p, r in PAIRS])
    cfg = DataConfig(name="jsonl", format="jsonl", path=str(path), eval_fraction=0.25)
    corpus = build_corpus(cfg, "sft", tokenizer, seq_len=256, micro_batch_size=2, seed=3)
    _check_sft_examples(corpus, tokenizer, 256)
    assert len(corpus.train) + len(corpus.eval) == len(PAIRS)
    assert len(corpus.eval) == 3

    answers = []
    for ids, labels in corpus.train + corpus.eval:
        answer = tokenizer.decode(ids[labels != IGNORE].tolist())
        assert answer.endswith("<|im_end|>\n")
        answers.append(answer[: -len("<|im_end|>\n")])
        prompt = tokenizer.decode(ids[labels == IGNORE].tolist())
        assert any(p in prompt for p, _ in PAIRS)
    assert sorted(answers) == sorted(r for _, r in PAIRS)
    # No chat is both trained on and held out.
    train_ids = {tuple(ids.tolist()) for ids, _ in corpus.train}
    assert not any(tuple(ids.tolist()) in train_ids for ids, _ in corpus.eval)


def test_build_corpus_sft_jsonl_messages_field(tokenizer, plain_tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = []
    for i, (p, r) in enumerate(PAIRS):
        chat = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        if i % 2:
            chat += [{"role": "user", "content": f"Thanks for {i}!"}, {"role": "assistant", "content": f"Welcome {i}."}]
        rows.append({"chat": chat, "id": i})
    _write_jsonl(path, rows)
    cfg = DataConfig(name="jsonl", format="jsonl", path=str(path), schema="messages", messages_field="chat",
                     eval_fraction=0.2)
    for tok in (tokenizer, plain_tokenizer):
        corpus = build_corpus(cfg, "sft", tok, seq_len=256, micro_batch_size=2, seed=0)
        _check_sft_examples(corpus, tok, 256)
        assert len(corpus.train) + len(corpus.eval) == len(rows)
        runs = sorted(len(_labelled_runs(ids.tolist(), labels.tolist())) for ids, labels in corpus.train + corpus.eval)
        assert runs == sorted(2 if i % 2 else 1 for i in range(len(rows)))


def test_build_corpus_chatterbot(tokenizer):
    cfg = DataConfig(name="chatterbot", format="chatterbot")
    corpus = build_corpus(cfg, "sft", tokenizer, seq_len=128, micro_batch_size=4, seed=1234)
    _check_sft_examples(corpus, tokenizer, 128)
    assert len(corpus.train) > 1000
    assert len(corpus.eval) >= 10


def test_malformed_jsonl_line_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        '{"prompt": "a", "response": "b"}\n'
        '{"prompt": "c", "response": "d"}\n'
        '{"prompt": "e", "response": \n'
        '{"prompt": "f", "response": "g"}\n',
        encoding="utf-8",
    )
    cfg = DataConfig(name="jsonl", format="jsonl", path=str(path))
    for mode in ("sft", "cpt"):
        with pytest.raises(UsageError) as info:
            build_corpus(cfg, mode, tokenizer, 64, 1, 0)
        assert f"{path}:3" in str(info.value)
        assert "malformed JSON" in str(info.value)


def test_jsonl_line_that_is_not_an_object(tokenizer, tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n["c", "d"]\n', encoding="utf-8")
    with pytest.raises(UsageError, match="expected a JSON object") as info:
        build_corpus(DataConfig(name="jsonl", format="jsonl", path=str(path)), "sft", tokenizer, 64, 1, 0)
    assert f"{path}:3" in str(info.value)


@pytest.mark.parametrize(
    "overrides, mode, field",
    [
        ({}, "sft", "response"),
        ({"prompt_field": "question"}, "sft", "question"),
        ({"schema": "messages", "messages_field": "conversation"}, "sft", "conversation"),
        ({"schema": "alpaca"}, "sft", "instruction"),
        ({"schema": "prompt_completion"}, "sft", "completion"),
        ({}, "cpt", "text"),
    ],
)
def test_missing_field_is_named(tokenizer, tmp_path, overrides, mode, field):
    path = tmp_path / "fields.jsonl"
    _write_jsonl(path, [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(4)])
    cfg = DataConfig(name="jsonl", format="jsonl", path=str(path), **overrides)
    with pytest.raises(UsageError) as info:
        build_corpus(cfg, mode, tokenizer, 64, 1, 0)
    assert f"no field {field!r}" in str(info.value)
    assert "prompt, answer" in str(info.value)  # the columns that are there


def test_bible_is_not_sft_data(tokenizer):
    with pytest.raises(UsageError, match="data=bible"):
        build_corpus(DataConfig(name="bible", format="bible"), "sft", tokenizer, 64, 1, 0)


def test_chatterbot_is_not_cpt_data(tokenizer):
    with pytest.raises(UsageError, match="data=chatterbot"):
        build_corpus(DataConfig(name="chatterbot", format="chatterbot"), "cpt", tokenizer, 64, 1, 0)
