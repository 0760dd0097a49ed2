"""Training and held-out examples for CPT (packed text) and SFT (chats with masked prompts)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from satrun.config import DataConfig
from satrun.data import cpt, sft
from satrun.data.batches import (BatchStream, Example, GlobalBatchSampler, collate, eval_batches, label_tokens,
                                 loss_rows, token_counts, token_rows)
from satrun.data.packing import fill_share, pack_chats
from satrun.data.sources import read_records
from satrun.errors import UsageError

__all__ = ["Corpus", "build_corpus", "BatchStream", "Example", "GlobalBatchSampler", "collate", "eval_batches",
           "label_tokens", "loss_rows", "pack_chats", "token_counts", "token_rows"]

FORMAT_VERSION = "2"  # bump when tokenization changes, to invalidate cached datasets


@dataclass(frozen=True)
class DataCounts:
    """What became of the data, for the start-up line and summary.json: records read and left
    out (unusable, beyond data.max_examples), held out, and at trainer.seq_len the chats cut
    (truncated) or left out (dropped: no answer token within it), or CPT's tokens after the last
    whole training block."""

    unit: str  # documents | chats
    read: int
    skipped: int
    capped: int
    held_out: int
    used: int  # training and held-out documents or chats the examples hold
    seq_len: int
    truncated: int = 0
    dropped: int = 0
    tail_tokens: int = 0

    def describe(self) -> str:
        text = f"{self.read} {self.unit} read"
        if self.skipped:
            text += f", {self.skipped} unusable skipped (data.skip_invalid=true)"
        if self.capped:
            text += f", {self.capped} beyond data.max_examples left out"
        text += f", {self.held_out} held out, {self.used} used"
        if self.truncated:
            text += f"; {self.truncated} chats truncated to trainer.seq_len={self.seq_len}"
        if self.dropped:
            text += f"; {self.dropped} chats dropped ({self.drop_reason()})"
        if self.tail_tokens:
            text += f"; the last {self.tail_tokens} training tokens (short of a block) left out"
        return text

    def drop_reason(self) -> str:
        return f"the prompt alone fills trainer.seq_len={self.seq_len}: no answer token left to train on"


@dataclass
class Corpus:
    train: list[Example]
    eval: list[Example]
    pad_id: int
    counts: DataCounts
    chats: Optional[tuple[int, int]] = None  # SFT: the training and held-out chats the examples hold
    packed: bool = False  # SFT: examples are rows of whole chats (data.packing)

    def describe(self, seq_len: int) -> str:
        """What the examples are, for the start-up line."""
        if self.chats is None:
            text = f"{len(self.train)} training and {len(self.eval)} held-out blocks of {seq_len} tokens"
        else:
            text = f"{self.chats[0]} training and {self.chats[1]} held-out chats"
            if not self.packed:
                text += " (each micro-batch padded to its longest chat)"
            else:
                text += (f", packed into {len(self.train)} and {len(self.eval)} rows of {seq_len} tokens "
                         f"(padding at most {100 * (1 - fill_share(self.train, seq_len)):.1f}% of the training rows)")
        return f"{text} [{self.counts.describe()}]"


def _tokenizer_id(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((spec + str(tokenizer.chat_template)).encode()).hexdigest()[:16]


def _fingerprint(ds: datasets.Dataset, *parts: object) -> str:
    key = "|".join([ds._fingerprint, FORMAT_VERSION, *map(str, parts)])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def build_corpus(
    cfg: DataConfig, mode: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, micro_batch_size: int, seed: int,
    train_on_inputs: bool = False,
) -> Corpus:
    """Read, split (by document/chat, so nothing leaks), tokenize (cached) and pack. In SFT,
    ``train_on_inputs`` labels the prompts too."""
    raw, records = read_records(cfg, mode)
    if len(raw) < 2:
        hint = " (try data.sample_by=paragraph)" if cfg.format == "text" and cfg.sample_by == "document" else ""
        raise UsageError(f"data={cfg.name} has a single document; need two or more to hold one out{hint}")
    n_eval = max(1, round(cfg.eval_fraction * len(raw)))
    split = raw.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    tok = _tokenizer_id(tokenizer)
    parts: dict[str, list[Example]] = {}
    chat_counts: dict[str, int] = {}
    truncated = dropped = tail = 0
    for name, ds in (("train", split["train"]), ("eval", split["test"])):
        if mode == "cpt":
            docs = cpt.tokenize_documents(ds, tokenizer, _fingerprint(ds, "cpt", tok))
            stream = cpt.token_stream(docs)
            blocks = cpt.pack(stream, seq_len, keep_tail=name == "eval")
            parts[name] = [(b, b) for b in blocks]
            tail += stream.numel() - sum(b.numel() for b in blocks)
        else:
            chats, cut = sft.tokenize_chats(ds, tokenizer, seq_len, _fingerprint(ds, "sft", tok, seq_len, train_on_inputs),
                                            train_on_inputs)
            truncated, dropped = truncated + cut.truncated, dropped + cut.dropped
            columns = chats.with_format("numpy")
            parts[name] = [
                (torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(lab, dtype=torch.long))
                for ids, lab in zip(columns["input_ids"], columns["labels"])
            ]
            chat_counts[name] = len(parts[name])
            if cfg.packing:
                parts[name] = pack_chats(parts[name], seq_len)
    used = len(raw) if mode == "cpt" else chat_counts["train"] + chat_counts["eval"]
    counts = DataCounts("documents" if mode == "cpt" else "chats", records.read, records.skipped, records.capped, n_eval,
                        used, seq_len, truncated, dropped, tail)
    unit = ("blocks of trainer.seq_len tokens" if mode == "cpt" else
            "packed rows of trainer.seq_len tokens" if cfg.packing else "chats with an answer")
    why = f" ({dropped} of {len(raw)} chats dropped: {counts.drop_reason()}; raise trainer.seq_len)" if dropped else ""
    if len(parts["train"]) < micro_batch_size:
        raise UsageError(
            f"data={cfg.name} gives {len(parts['train'])} training {unit}, fewer than "
            f"trainer.micro_batch_size={micro_batch_size}{why}"
        )
    if not parts["eval"]:
        raise UsageError(f"data={cfg.name} gives no held-out {unit}{why or '; raise data.eval_fraction'}")
    return Corpus(train=parts["train"], eval=parts["eval"], pad_id=int(tokenizer.pad_token_id), counts=counts,
                  chats=(chat_counts["train"], chat_counts["eval"]) if mode == "sft" else None, packed=mode == "sft" and cfg.packing)
