"""Batches of token examples: padding collation (of chats or packed rows) and a seeded, resumable training stream."""

from __future__ import annotations

import functools
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.data

from satrun.labels import IGNORE
from satrun.errors import UsageError

Example = tuple  # (input_ids, labels) or, packed, (input_ids, labels, position_ids); 1-D int64 each


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding carries no label.

    Unpacked examples get an attention mask where some row is padded (none otherwise, so
    attention keeps its fast causal-only path). Packed rows (examples with position ids, see
    ``packing``) get ``position_ids`` and no mask: the padding is one more sequence of its own,
    its positions restarting at 0, so nothing attends to it or from it into a chat.

    Besides the model's inputs a batch holds, computed here on the host so the training step
    needs no device sync for them: ``loss_rows`` and ``free_rows``, the flat positions
    (``row * length + column``) whose next token carries a label and those whose next token
    carries none, and ``counts``, a host tensor [labelled, unlabelled, padding] of token counts.
    """
    longest = max(ex[0].numel() for ex in examples)
    packed = len(examples[0]) == 3
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    positions = torch.arange(longest).repeat(len(examples), 1) if packed else None
    for row, ex in enumerate(examples):
        n = ex[0].numel()
        input_ids[row, :n] = ex[0]
        labels[row, :n] = ex[1]
        mask[row, :n] = 1
        if positions is not None:
            positions[row, :n] = ex[2]
            positions[row, n:] = torch.arange(longest - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if positions is not None:
        batch["position_ids"] = positions
    elif not bool(mask.all()):
        batch["attention_mask"] = mask
    batch.update(row_split(labels))
    padding = int((mask == 0).sum())
    labelled = batch["loss_rows"].numel()
    batch["counts"] = torch.tensor([labelled, labels.numel() - labelled - padding, padding])
    return batch


def row_split(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``loss_rows`` and ``free_rows`` of a batch's labels (see :func:`collate`)."""
    carries = (F.pad(labels, (0, 1), value=IGNORE)[:, 1:] != IGNORE).flatten()
    return {"loss_rows": carries.nonzero().flatten(), "free_rows": (~carries).nonzero().flatten()}


def loss_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The flat positions whose next token carries a label: collated batches hold them; other
    batches (written by hand, or by other tools) get them computed (a device sync there)."""
    rows = batch.get("loss_rows")
    return rows if rows is not None else row_split(batch["labels"])["loss_rows"]


def token_rows(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(``loss_rows``, ``free_rows``): the rows a token-aware sparsifier computes densely and sparsely."""
    if "loss_rows" in batch and "free_rows" in batch:
        return batch["loss_rows"], batch["free_rows"]
    split = row_split(batch["labels"])
    return split["loss_rows"], split["free_rows"]


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(labelled, unlabelled, padding) tokens of a collated batch, read on the host."""
    labelled, unlabelled, padding = batch["counts"].tolist()
    return labelled, unlabelled, padding


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches of example indices, reshuffled each epoch from ``seed + epoch``.

    Each batch is this rank's contiguous slice of one global batch of ``ranks * batch_size``
    indices, so the ranks together take exactly what one process with the global batch size
    would (torch's ``DistributedSampler`` interleaves ranks and pads the epoch, which would not).
    An epoch's tail shorter than a global batch is skipped. The position is two integers, the
    state to resume from.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, ranks: int = 1) -> None:
        self.size, self.global_batch, self.seed = size, batch_size * ranks, seed
        self.rank_slice = slice(rank * batch_size, (rank + 1) * batch_size)
        self.epoch, self.position = 0, 0
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its permutation)

    def _permutation(self) -> list[int]:
        if self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(self.size, generator=generator).tolist())
        return self._order[1]

    def __iter__(self) -> Iterator[list[int]]:
        while True:  # reads the position afresh each time, so a loaded state takes effect at once
            if self.position + self.global_batch > self.size:
                self.epoch, self.position = self.epoch + 1, 0
            chosen = self._permutation()[self.position : self.position + self.global_batch][self.rank_slice]
            self.position += self.global_batch
            yield chosen

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class BatchStream:
    """Endless shuffled, collated micro-batches: a ``DataLoader`` over ``GlobalBatchSampler``.

    A resumed run continues with the very next batch without replaying the data. Under data
    parallelism each of ``ranks`` streams takes its slice (``rank``) of one global batch. With
    ``pin_memory`` (for a CUDA device) batches come in page-locked host memory, so that
    ``.to(device, non_blocking=True)`` copies asynchronously. Batches are collated in this
    process (no workers), one per ``next()``, so the sampler's position is always that of the
    batches taken; the loader's seed comes from a private generator, so iterating leaves torch's
    global random state alone (which a resumed run restores).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, seed: int,
                 rank: int = 0, ranks: int = 1, pin_memory: bool = False) -> None:
        if len(examples) < batch_size * ranks:
            raise UsageError(f"{len(examples)} training examples are fewer than one global batch "
                             f"({ranks} ranks x micro-batch {batch_size})")
        self.sampler = GlobalBatchSampler(len(examples), batch_size, seed, rank, ranks)
        self.loader = torch.utils.data.DataLoader(
            examples, batch_sampler=self.sampler, collate_fn=functools.partial(collate, pad_id=pad_id),
            num_workers=0, pin_memory=pin_memory, generator=torch.Generator(),
        )
        self._batches: Optional[Iterator[dict[str, torch.Tensor]]] = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.loader)
        return next(self._batches)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int, limit: int) -> list[dict[str, torch.Tensor]]:
    """The held-out set in order, ``limit`` batches at most (0 = all)."""
    starts = range(0, len(examples), batch_size)
    if limit:
        starts = starts[:limit]
    return [collate(examples[s : s + batch_size], pad_id) for s in starts]


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labelled positions after the one-token shift (read from the
    batch's shape where it was collated: no device sync)."""
    return loss_rows(batch).numel()
