"""Batches of token examples: padding collation and a seeded, resumable training stream."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from satrun.errors import UsageError

from satrun.data.sft import IGNORE

Example = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), 1-D int64


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding carries no label and no attention.

    When nothing needs padding no attention mask is returned, so attention keeps its fast
    causal-only path.
    """
    longest = max(ids.numel() for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : ids.numel()] = ids
        labels[row, : lab.numel()] = lab
        mask[row, : ids.numel()] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    if not bool(mask.all()):
        batch["attention_mask"] = mask
    return batch


class BatchStream:
    """Endless shuffled micro-batches, reshuffled each epoch from ``seed + epoch``.

    Its position is two integers, so a resumed run continues with the very next batch without
    replaying the data. Under data parallelism each of ``ranks`` streams takes its slice
    (``rank``) of one global batch of ``ranks * batch_size`` examples, so the ranks together see
    what one process with the global batch size would.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, seed: int,
                 rank: int = 0, ranks: int = 1) -> None:
        if len(examples) < batch_size * ranks:
            raise UsageError(f"{len(examples)} training examples are fewer than one global batch "
                             f"({ranks} ranks x micro-batch {batch_size})")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size * ranks, pad_id, seed
        self.rank_slice = slice(rank * batch_size, (rank + 1) * batch_size)
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position + self.batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        chosen = self._order[self.position : self.position + self.batch_size][self.rank_slice]
        self.position += self.batch_size
        return collate([self.examples[i] for i in chosen], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int, limit: int) -> list[dict[str, torch.Tensor]]:
    """The held-out set in order, ``limit`` batches at most (0 = all)."""
    starts = range(0, len(examples), batch_size)
    if limit:
        starts = starts[:limit]
    return [collate(examples[s : s + batch_size], pad_id) for s in starts]


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labelled positions after the one-token shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
