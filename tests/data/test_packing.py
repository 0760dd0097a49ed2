"""Packed SFT rows: whole chats per row, no attention across chats, each chat's loss and gradients
those of the chat alone; evaluation packed reports the unpacked loss."""

from __future__ import annotations

import pytest
import torch

from satrun.data.batches import collate, eval_batches, label_tokens, token_counts
from satrun.data.packing import fill_share, pack_chats
from satrun.labels import IGNORE
from satrun.sat.settings import MetricConfig, SelectorConfig
from satrun.sat.sparsifier import Sparsifier
from satrun.training.loss import causal_lm_loss
from tests.sat.models import build

PAD = 0


def chat(n: int, prompt: int, seed: int, vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    """A chat of ``n`` tokens whose first ``prompt`` carry no label."""
    ids = torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:prompt] = IGNORE
    return ids, labels


def test_rows_hold_whole_chats_within_the_row_length() -> None:
    chats = [chat(n, 2, i) for i, n in enumerate([9, 3, 14, 5, 7, 2, 12, 6, 1, 8])]
    rows = pack_chats(chats, 16)
    assert all(r[0].numel() <= 16 for r in rows)
    assert sum(r[0].numel() for r in rows) == sum(c[0].numel() for c in chats)
    assert len(rows) == 5 and fill_share(rows, 16) == pytest.approx(67 / 80)  # the best possible: 67 tokens need 5 rows
    found = []
    for ids, labels, positions in rows:
        starts = (positions == 0).nonzero().flatten().tolist() + [ids.numel()]
        for a, b in zip(starts, starts[1:]):
            match = [i for i, c in enumerate(chats) if torch.equal(c[0], ids[a:b])]
            assert len(match) == 1
            found.append(match[0])
            assert torch.equal(positions[a:b], torch.arange(b - a))
            assert labels[a] == IGNORE and torch.equal(labels[a + 1:b], chats[match[0]][1][1:])
    assert sorted(found) == list(range(len(chats)))
    assert pack_chats(chats, 16)[0][0].tolist() == rows[0][0].tolist()  # deterministic


def test_packed_batches_have_position_ids_no_mask_and_a_padding_sequence() -> None:
    rows = pack_chats([chat(5, 2, 0), chat(4, 1, 1), chat(7, 3, 2)], 9)
    batch = collate(rows, PAD)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    lengths = [r[0].numel() for r in rows]
    for row, n in enumerate(lengths):  # the padding restarts its positions: a sequence of its own
        assert batch["position_ids"][row, n:].tolist() == list(range(max(lengths) - n))
    labelled, unlabelled, padding = token_counts(batch)
    assert padding == sum(max(lengths) - n for n in lengths)
    assert labelled == label_tokens(batch) == (5 - 2) + (4 - 1) + (7 - 3)  # each chat's answer tokens
    assert labelled + unlabelled + padding == batch["input_ids"].numel()
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:].flatten()
    assert bool((targets[batch["loss_rows"]] != IGNORE).all()) and bool((targets[batch["free_rows"]] == IGNORE).all())


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch, 1.0)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_each_chats_loss_and_gradients_in_a_packed_row_equal_the_chat_alone(arch: str) -> None:
    model = build(arch)
    chats = [chat(11, 4, 0), chat(7, 3, 1), chat(13, 5, 2)]
    [row] = pack_chats(chats, 40)
    starts = (row[2] == 0).nonzero().flatten().tolist() + [row[0].numel()]
    for a, b in zip(starts, starts[1:]):
        alone = next(c for c in chats if torch.equal(c[0], row[0][a:b]))
        only = row[1].clone()
        only[:a], only[b:] = IGNORE, IGNORE  # this chat's labels alone, in the packed row
        packed_loss, packed_grads = _loss_and_grads(model, collate([(row[0], only, row[2])], PAD))
        alone_loss, alone_grads = _loss_and_grads(model, collate([alone], PAD))
        assert abs(packed_loss - alone_loss) <= 1e-5
        assert packed_grads.keys() == alone_grads.keys()
        for name, grad in alone_grads.items():
            assert (packed_grads[name] - grad).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("sat", ["dense", "all tokens, heads too", "unlabelled tokens"])
def test_changing_one_chat_leaves_the_others_logits_unchanged(sat: str) -> None:
    model = build("llama-gqa")
    chats = [chat(9, 3, 0), chat(12, 4, 1), chat(8, 2, 2)]
    [row] = pack_chats(chats, 32)
    changed = row[0].clone()
    changed[:12] = (changed[:12] + 5) % 97  # the 12-token chat, placed first (the longest)
    sparsifier = None
    if sat != "dense":  # random scores, zero fill: the selection does not depend on the tokens
        sparsifier = Sparsifier(model, MetricConfig(name="random"), SelectorConfig(name="topk", fill="zero"), seed=3,
                                tokens="all" if sat.startswith("all") else "unlabelled")
    logits = []
    for ids in (row[0], changed):
        batch = collate([(ids, row[1], row[2])], PAD)
        if sparsifier is not None:
            sparsifier.set_rates(0.5, 0.5 if sparsifier.tokens == "all" else 0.0, step=0)
            sparsifier.set_token_rows(batch["loss_rows"], batch["free_rows"])
        logits.append(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.detach()[0])
    first = row[0].numel() - 9 - 8  # where the other two chats start
    assert first == 12
    assert (logits[0][first:] - logits[1][first:]).abs().max().item() <= 1e-6
    assert (logits[0][:first] - logits[1][:first]).abs().max().item() > 1e-3  # the change did reach its own chat


def test_packed_evaluation_reports_the_unpacked_loss() -> None:
    model = build("llama-gqa").eval()
    chats = [chat(5 + (7 * i) % 13, 2 + i % 3, i) for i in range(12)]

    def mean_loss(batches: list[dict]) -> float:
        with torch.no_grad():
            total = sum(causal_lm_loss(model, b, 1.0).item() for b in batches)
        return total / sum(label_tokens(b) for b in batches)

    unpacked = mean_loss(eval_batches(chats, 3, PAD, limit=0))
    packed = mean_loss(eval_batches(pack_chats(chats, 24), 3, PAD, limit=0))
    assert packed == pytest.approx(unpacked, rel=1e-6)


def test_a_chat_longer_than_the_row_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than a row"):
        pack_chats([chat(10, 2, 0)], 8)

