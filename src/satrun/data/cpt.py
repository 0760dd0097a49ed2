"""Continual pre-training data: tokenize documents, join them with EOS, cut into equal blocks."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from satrun.data.sources import TEXT


def tokenize_documents(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, fingerprint: str) -> datasets.Dataset:
    """Each document's token ids followed by EOS (no BOS: blocks start mid-stream anyway)."""
    return ds.map(
        _tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer},
        batched=True,
        remove_columns=ds.column_names,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    ids = tokenizer(batch[TEXT], add_special_tokens=False)["input_ids"]
    return {"input_ids": [doc + [tokenizer.eos_token_id] for doc in ids]}


def token_stream(tokenized: datasets.Dataset) -> torch.Tensor:
    """All documents' ids concatenated in order, as one int64 tensor."""
    column = tokenized.data.column("input_ids").combine_chunks()
    return torch.from_numpy(np.asarray(column.flatten(), dtype=np.int64))


def pack(stream: torch.Tensor, seq_len: int, keep_tail: bool = False) -> list[torch.Tensor]:
    """Consecutive ``seq_len`` blocks of ``stream``; the short tail is kept only if asked (eval)."""
    full = stream.numel() // seq_len
    blocks = list(stream[: full * seq_len].view(full, seq_len))
    if keep_tail and stream.numel() > full * seq_len:
        blocks.append(stream[full * seq_len :])
    return blocks
