"""Packed SFT rows: whole chats bin-packed into rows of ``seq_len`` tokens.

Each packed row is an example with a third tensor, its position ids, which restart at 0 at the
first token of every chat. transformers reads restarting position ids (with no attention mask)
as packed sequences and builds a block-diagonal causal mask from them (``masking_utils``;
flash-attention's varlen path on CUDA uses the same position ids), so no token attends to another
chat and each chat sees the positions it would see alone. It does so only without a KV cache:
the forward must pass ``use_cache=False`` (the loss does), or the chats attend to each other. The first label of every chat is
cleared: alone it is never a target (targets are the labels shifted by one), packed it would be
the previous chat's last target.

Packing is best-fit decreasing (longest chat first, into the row whose free space fits it most
tightly), computed once when the corpus is built, so rows are deterministic and a resumed run sees
the same rows. A chat longer than ``seq_len`` was truncated when it was tokenized.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from satrun.data.batches import Example
from satrun.labels import IGNORE


def pack_chats(chats: Sequence[Example], seq_len: int) -> list[Example]:
    """Rows of at most ``seq_len`` tokens, each a concatenation of whole chats (in the order
    they were placed), with restarting position ids."""
    order = sorted(range(len(chats)), key=lambda i: (-chats[i][0].numel(), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row), sorted: the tightest fit is the first that fits
    for i in order:
        n = chats[i][0].numel()
        if n > seq_len:
            raise ValueError(f"a chat of {n} tokens is longer than a row of {seq_len}")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            space, row = seq_len - n, len(rows) - 1
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            space -= n
        if space:
            bisect.insort(free, (space, row))
    return [_join([chats[i] for i in row]) for row in rows]


def _join(chats: Sequence[Example]) -> Example:
    ids = torch.cat([c[0] for c in chats])
    labels = torch.cat([c[1] for c in chats])
    starts = torch.tensor([0] + [c[0].numel() for c in chats[:-1]]).cumsum(0)
    labels[starts] = IGNORE
    positions = torch.cat([torch.arange(c[0].numel()) for c in chats])
    return ids, labels, positions


def fill_share(rows: Sequence[Example], seq_len: int) -> float:
    """The share of the rows' ``seq_len`` slots that hold a token (1 - the padding share, were
    every row padded to ``seq_len``)."""
    return sum(r[0].numel() for r in rows) / (len(rows) * seq_len) if rows else 0.0
