"""Batches: padding collation, label counting, and the seeded, resumable training stream."""

from __future__ import annotations

import json

import pytest
import torch

from satrun.config import DataConfig
from satrun.data import build_corpus
from satrun.data.batches import BatchStream, GlobalBatchSampler, collate, eval_batches, label_tokens
from satrun.labels import IGNORE

PAD = 99


def _ex(ids: list[int], labels: list[int] | None = None):
    return torch.tensor(ids, dtype=torch.long), torch.tensor(ids if labels is None else labels, dtype=torch.long)


def test_collate_pads_and_masks():
    examples = [_ex([1, 2, 3], [IGNORE, 2, 3]), _ex([4, 5, 6, 7, 8], [IGNORE, IGNORE, 6, 7, 8]), _ex([9], [IGNORE])]
    batch = collate(examples, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD, PAD], [4, 5, 6, 7, 8], [9, PAD, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [
        [IGNORE, 2, 3, IGNORE, IGNORE],
        [IGNORE, IGNORE, 6, 7, 8],
        [IGNORE] * 5,
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].dtype == torch.long
    # No label on a padded position.
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE).all())
    # Labels count after the one-token shift: position 0 never carries a loss.
    assert label_tokens(batch) == 2 + 3 + 0


def test_collate_without_padding_has_no_attention_mask():
    batch = collate([_ex([1, 2, 3]), _ex([4, 5, 6])], pad_id=PAD)
    assert set(batch) == {"input_ids", "labels", "loss_rows", "free_rows", "counts"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert label_tokens(batch) == 2 * 2  # every position but the first of each row


def test_label_tokens_ignores_position_zero_only():
    batch = {"labels": torch.tensor([[5, IGNORE, 7], [IGNORE, IGNORE, IGNORE], [1, 2, 3]])}
    assert label_tokens(batch) == 1 + 0 + 2


def test_eval_batches_in_order_with_limit():
    examples = [_ex([i] * (1 + i % 3)) for i in range(7)]
    all_batches = eval_batches(examples, batch_size=3, pad_id=PAD, limit=0)
    assert [b["input_ids"].shape[0] for b in all_batches] == [3, 3, 1]
    assert [row[0] for b in all_batches for row in b["input_ids"].tolist()] == list(range(7))
    limited = eval_batches(examples, batch_size=3, pad_id=PAD, limit=2)
    assert len(limited) == 2
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(limited, all_batches))


def _examples(n: int) -> list:
    """Distinct examples; the first token names the example."""
    return [_ex([i, 1000 + i, 2000 + i]) for i in range(n)]


def _ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def _take(stream: BatchStream, n: int) -> list[list[int]]:
    return [_ids(next(stream)) for _ in range(n)]


def test_stream_is_deterministic_per_seed():
    examples = _examples(10)
    a = _take(BatchStream(examples, 3, PAD, seed=5), 12)
    b = _take(BatchStream(examples, 3, PAD, seed=5), 12)
    c = _take(BatchStream(examples, 3, PAD, seed=6), 12)
    assert a == b
    assert a != c
    assert all(len(batch) == 3 for batch in a)


def test_each_example_once_per_epoch():
    examples = _examples(12)
    stream = BatchStream(examples, 4, PAD, seed=0)
    epochs = [sorted(sum(_take(stream, 3), [])) for _ in range(3)]
    assert all(epoch == list(range(12)) for epoch in epochs)
    assert stream.state_dict() == {"epoch": 2, "position": 12}

    # Not a multiple of the batch size: the remainder is skipped, nothing repeats within an epoch.
    stream = BatchStream(_examples(10), 3, PAD, seed=0)
    for expected_epoch in range(3):
        seen = sum(_take(stream, 3), [])
        assert len(seen) == len(set(seen)) == 9
        assert stream.state_dict()["epoch"] == expected_epoch
    # Epochs are shuffled differently.
    stream = BatchStream(_examples(12), 4, PAD, seed=0)
    assert sum(_take(stream, 3), []) != sum(_take(stream, 3), [])


def test_stream_batches_are_collated():
    examples = [_ex([i] * (1 + i % 4)) for i in range(8)]
    batch = next(BatchStream(examples, 8, PAD, seed=1))
    assert batch["input_ids"].shape == (8, 4)
    assert "attention_mask" in batch
    assert int(batch["attention_mask"].sum()) == sum(ids.numel() for ids, _ in examples)


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 4, 7])
def test_resume_continues_with_the_same_batches(consumed):
    examples = _examples(10)
    original = BatchStream(examples, 3, PAD, seed=42)
    _take(original, consumed)
    state = original.state_dict()
    assert set(state) == {"epoch", "position"}

    resumed = BatchStream(examples, 3, PAD, seed=42)
    resumed.load_state_dict(dict(state))
    assert resumed.state_dict() == state
    expected = [next(original) for _ in range(8)]
    got = [next(resumed) for _ in range(8)]
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_batches_are_those_of_the_hand_written_stream_before_the_dataloader():
    """Pinned sequences: a checkpoint's data position means the same batches as it did before
    the stream became a DataLoader (the earlier hand-written iteration gave exactly these)."""
    assert _take(BatchStream(_examples(10), 3, PAD, seed=42), 8) == [
        [2, 6, 1], [8, 4, 5], [0, 9, 3], [8, 4, 9], [0, 5, 1], [6, 7, 2], [2, 6, 3], [8, 7, 9]]
    assert _take(BatchStream(_examples(10), 2, PAD, seed=7, rank=1, ranks=2), 8) == [
        [3, 4], [9, 6], [0, 1], [4, 7], [8, 7], [9, 1], [6, 1], [9, 8]]


@pytest.mark.parametrize("n,micro,ranks", [(12, 2, 2), (10, 1, 3), (11, 3, 2)])
def test_ranks_together_take_the_global_batch_of_one_process(n, micro, ranks):
    """Contiguous slices, not torch's DistributedSampler (rank::world interleaving, padded epochs):
    concatenated in rank order, the ranks' batches are one process's batch of ranks x micro."""
    examples = _examples(n)
    single = BatchStream(examples, micro * ranks, PAD, seed=3)
    streams = [BatchStream(examples, micro, PAD, seed=3, rank=r, ranks=ranks) for r in range(ranks)]
    for _ in range(3 * n // (micro * ranks) + 2):  # across several epochs, ragged tails included
        parts = [next(s) for s in streams]
        whole = next(single)
        assert all(p["input_ids"].shape[0] == micro for p in parts)
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole["input_ids"])
        assert all(s.state_dict() == single.state_dict() for s in streams)


def test_too_few_examples_for_a_global_batch_is_a_usage_error():
    from satrun.errors import UsageError

    with pytest.raises(UsageError, match="fewer than one global batch"):
        BatchStream(_examples(5), 3, PAD, seed=0, rank=0, ranks=2)


def test_loading_a_state_into_a_running_stream_continues_from_it():
    examples = _examples(10)
    source = BatchStream(examples, 3, PAD, seed=1)
    _take(source, 5)
    state = source.state_dict()
    running = BatchStream(examples, 3, PAD, seed=1)
    _take(running, 2)  # its DataLoader iterator exists already
    running.load_state_dict(state)
    assert _take(running, 6) == _take(source, 6)


def test_the_stream_is_a_dataloader_that_leaves_the_global_rng_alone():
    stream = BatchStream(_examples(10), 3, PAD, seed=1, pin_memory=False)
    assert isinstance(stream.loader, torch.utils.data.DataLoader)
    assert stream.loader.batch_sampler is stream.sampler and isinstance(stream.sampler, GlobalBatchSampler)
    assert stream.loader.num_workers == 0 and not stream.loader.pin_memory
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _take(stream, 7)  # creating the loader's iterator draws its base seed from a private generator
    stream.load_state_dict({"epoch": 0, "position": 0})
    _take(stream, 2)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_for_cuda():
    pinned = next(BatchStream(_examples(10), 3, PAD, seed=1, pin_memory=True))
    plain = next(BatchStream(_examples(10), 3, PAD, seed=1))
    assert all(t.is_pinned() for t in pinned.values())
    assert all(torch.equal(pinned[k], plain[k]) for k in plain)


def test_no_label_leaks_between_examples_in_padded_sft_batches(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Say " + "word " * (i % 5 + 1), "response": " ".join(["yes"] * (1 + 3 * i))} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    corpus = build_corpus(
        DataConfig(name="jsonl", format="jsonl", path=str(path), eval_fraction=0.25), "sft", tokenizer, 512, 4, 9
    )
    by_ids = {tuple(ids.tolist()): labels for ids, labels in corpus.train}
    assert len(by_ids) == len(corpus.train)
    assert len({ids.numel() for ids, _ in corpus.train}) > 1, "examples of one length would need no padding"

    stream = BatchStream(corpus.train, 4, corpus.pad_id, seed=0)
    padded = 0
    for _ in range(2 * len(corpus.train) // 4):
        batch = next(stream)
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        padded += int((mask == 0).sum())
        for row in range(batch["input_ids"].shape[0]):
            length = int(mask[row].sum())
            assert bool((mask[row, :length] == 1).all()) and bool((mask[row, length:] == 0).all())
            labels = batch["labels"][row]
            labelled = (labels != IGNORE).nonzero().flatten()
            assert labelled.numel() > 0
            assert int(labelled.max()) < length, "a label on a padded position"
            ids = tuple(batch["input_ids"][row, :length].tolist())
            assert ids in by_ids, "a row is not one of the examples"
            assert torch.equal(labels[:length], by_ids[ids])
            assert bool((batch["input_ids"][row, length:] == corpus.pad_id).all())
    assert padded > 0

    rows_seen = 0
    for batch in eval_batches(corpus.eval, 3, corpus.pad_id, limit=0):
        for row in range(batch["input_ids"].shape[0]):
            ids, labels = corpus.eval[rows_seen]
            n = ids.numel()
            assert torch.equal(batch["labels"][row, :n], labels)
            assert bool((batch["labels"][row, n:] == IGNORE).all())
            rows_seen += 1
    assert rows_seen == len(corpus.eval)
