"""Supervised fine-tuning data: chats rendered by the chat template, loss on assistant turns only
(or, with ``mode.train_on_inputs``, on every token).

A chat is rendered turn by turn. For each assistant turn k the template is applied to the turns
before k with a generation prompt, and to the turns up to k; the text in between is the answer
(with the template's end-of-turn marker) and is the only text that carries labels. Every rendered
prefix must be a prefix of the next rendering, which holds for well-behaved templates and is
checked. Tokenizers without a chat template use a plain "User: / Assistant:" format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from satrun.data.sources import MESSAGES
from satrun.errors import UsageError

from satrun.labels import IGNORE


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The chat as text, via the tokenizer's template, or a plain format without one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(
        f"{m['role'].capitalize()}: {m['content']}{tokenizer.eos_token if m['role'] == 'assistant' else ''}\n"
        for m in messages
    )
    return text + ("Assistant:" if generation_prompt else "")


def segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered chat split into (text, is_trained) pieces."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:k], generation_prompt=True)
        full = render(tokenizer, messages[: k + 1], generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UsageError("the tokenizer's chat template does not render chats incrementally; cannot mask prompts")
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], seq_len: int, train_on_inputs: bool = False
) -> dict[str, Any]:
    """input_ids and labels (IGNORE on prompt tokens unless ``train_on_inputs``), truncated to
    ``seq_len``, and ``length``, the chat's tokens before truncation. The chat is tokenized piece
    by piece either way, so both settings see the same ids."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained or train_on_inputs else [IGNORE] * len(ids)
    return {"input_ids": input_ids[:seq_len], "labels": labels[:seq_len], "length": len(input_ids)}


@dataclass(frozen=True)
class ChatCounts:
    """What became of a split's chats at ``trainer.seq_len``."""

    chats: int  # chats tokenized
    truncated: int  # kept, cut at seq_len (part of an answer is lost)
    dropped: int  # no answer token within seq_len (the prompt alone fills it): nothing to train on


def tokenize_chats(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, fingerprint: str, train_on_inputs: bool = False
) -> tuple[datasets.Dataset, ChatCounts]:
    """Tokenized chats, those with no answer token left within ``seq_len`` dropped, and the counts."""
    tokenized = ds.map(
        _tokenize_row,
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "train_on_inputs": train_on_inputs},
        remove_columns=ds.column_names,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )
    answered = tokenized.filter(lambda row: any(t != IGNORE for t in row["labels"]), new_fingerprint=fingerprint + "-nonempty")
    truncated = int(sum(length > seq_len for length in answered["length"]))
    return answered.remove_columns("length"), ChatCounts(len(tokenized), truncated, len(tokenized) - len(answered))


def _tokenize_row(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                  train_on_inputs: bool) -> dict[str, list[int]]:
    return tokenize_chat(tokenizer, row[MESSAGES], seq_len, train_on_inputs)
