"""The FLOP model against an independent count (torch's FlopCounterMode), dense and sparse."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from satrun.perf.flops import Shape, ideal_speedup, token_flops
from satrun.perf.plan import parameters
from satrun.sat import MetricConfig, SelectorConfig, Sparsifier

SEQ = 32


def tiny(heads: int, kv_heads: int, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation=attn)
    return LlamaForCausalLM(config).train()


def counted(model: torch.nn.Module) -> dict[str, float]:
    ids = torch.randint(0, 97, (2, SEQ))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False)
    return {str(op): n / ids.numel() for op, n in counter.get_flop_counts()["Global"].items()}


def packed_batch() -> dict:
    """Four chats of a prompt and an answer, packed into rows of SEQ tokens (with padding)."""
    from satrun.data.batches import collate
    from satrun.data.packing import pack_chats
    from satrun.labels import IGNORE

    g = torch.Generator().manual_seed(0)
    chats = []
    for n, prompt in [(12, 7), (9, 5), (14, 10), (6, 2)]:
        ids = torch.randint(0, 97, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = IGNORE
        chats.append((ids, labels))
    return collate(pack_chats(chats, SEQ), pad_id=0)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_matmul_flops_match_an_independent_count(heads: int, kv_heads: int, rate: float) -> None:
    model = tiny(heads, kv_heads)
    if rate:  # random scores: scoring itself adds no matrix product here (maxip's is checked below)
        sat = Sparsifier(model, MetricConfig(name="random"), SelectorConfig(fill="zero"))
        sat.set_rates(rate, rate, step=0)
    ours = token_flops(Shape.from_config(model.config), SEQ, rate, rate)
    # On CPU the SDPA kernel is not counted: every counted op is a matrix product of the model.
    assert counted(model)["aten.mm"] == pytest.approx(ours.attn_proj + ours.mlp + ours.lm_head)


def test_maxip_scoring_and_mean_fill_cost_one_stride_of_the_scored_projections() -> None:
    model = tiny(4, 2)
    sat = Sparsifier(model, MetricConfig(name="maxip", token_stride=16), SelectorConfig(fill="mean"))
    sat.set_rates(0.5, 0.5, step=0)
    shape = Shape.from_config(model.config)
    ours = token_flops(shape, SEQ, 0.5, 0.5)
    h, i, d = shape.hidden, shape.intermediate, shape.head_dim
    scoring = shape.layers * (2 * h * i * 2 + 2 * h * (shape.heads + shape.kv_heads) * d) / 16
    assert counted(model)["aten.mm"] == pytest.approx(ours.attn_proj + ours.mlp + ours.lm_head + scoring)


def test_attention_core_flops_match_eager_attention() -> None:
    model = tiny(4, 4, attn="eager")
    ours = token_flops(Shape.from_config(model.config), SEQ)
    # Eager attention computes the full s x s scores; the model counts the causal half.
    assert counted(model)["aten.bmm"] == pytest.approx(2 * ours.attn_core)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_the_model(tied: bool) -> None:
    model = tiny(4, 2)
    if tied:
        model = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": True}))
    shape = Shape.from_config(model.config)
    assert shape.tied == tied
    assert parameters(shape) == sum(p.numel() for p in model.parameters())  # a tied head is counted once


@pytest.mark.parametrize("per_layer", [False, True])
def test_layer_rates_align_and_layers_match_an_independent_count(per_layer: bool) -> None:
    model = tiny(4, 4)
    shape = Shape.from_config(model.config)
    layers = None if per_layer else [1]
    mlp = [0.0, 0.6] if per_layer else 0.6  # either way layer 0's MLP stays dense
    sat = Sparsifier(model, MetricConfig(name="random"), SelectorConfig(align=32, fill="zero"), layers=layers)
    sat.set_rates(mlp, 0.5, step=0)
    ours = token_flops(shape, SEQ, mlp, 0.5, align=32, layers=layers)
    assert counted(model)["aten.mm"] == pytest.approx(ours.attn_proj + ours.mlp + ours.lm_head)
    h, i = shape.hidden, shape.intermediate
    assert ours.mlp == pytest.approx(6 * h * i + 6 * h * 32)  # 0.4 x 96 = 38 kept, aligned to 32
    assert ours.mlp != token_flops(shape, SEQ, mlp, 0.5, layers=layers).mlp  # the count depends on align


@pytest.mark.parametrize(
    "shape, seq, attn_rate, expected",  # the ideal speed-ups of the project's method notes, MLP rate 0.5
    [(Shape(4096, 11008, 32, 32, 32, 128, 32000), 2048, 0.5, 1.96),
     # SmolLM2 (9 query heads in 3 KV groups): the notes keep 4 of 9 heads at rate 0.5; grouped
     # selection keeps whole counts per group, 6 heads at rate 0.5 or 3 at rate 2/3, which bracket it
     (Shape(576, 1536, 30, 9, 3, 64, 49152), 256, None, 1.60)],
)
def test_ideal_speedup_agrees_with_the_method_notes(shape: Shape, seq: int, attn_rate, expected: float) -> None:
    if attn_rate is not None:
        assert ideal_speedup(shape, seq, 0.5, attn_rate) == pytest.approx(expected, rel=0.02)
        return
    assert ideal_speedup(shape, seq, 0.5, 0.5) < expected < ideal_speedup(shape, seq, 0.5, 2 / 3)


def test_grouped_query_heads_are_kept_in_whole_per_group_counts() -> None:
    from satrun.sat.selection import kept_count, kept_heads

    assert kept_heads(32, 32, 0.3) == kept_count(32, 0.3) == 22  # multi-head: free
    assert kept_heads(32, 8, 0.3) == 8 * 3 and kept_heads(9, 3, 0.5) == 6 and kept_heads(9, 3, 0.9) == 3


def test_step_flops_follow_the_token_split_and_match_an_independent_count() -> None:
    """A token-aware sparse forward of a packed batch: the decoder's matrix products as counted
    by torch equal the FLOP model's for the batch's labelled / unlabelled / padding tokens."""
    from satrun.data.batches import token_counts
    from satrun.perf.flops import step_flops

    model = tiny(4, 2)
    batch = packed_batch()
    counts = token_counts(batch)
    assert counts[2] > 0 and counts[0] < counts[1]  # padding, and fewer labelled than unlabelled tokens
    shape, length = Shape.from_config(model.config), batch["input_ids"].shape[1]
    sat = Sparsifier(model, MetricConfig(name="random"), SelectorConfig(fill="zero"), tokens="unlabelled")
    sat.set_rates(0.5, 0.0, step=0)
    sat.set_token_rows(batch["loss_rows"], batch["free_rows"])
    with FlopCounterMode(display=False) as counter:
        model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    counted = counter.get_flop_counts()["Global"]
    mm = sum(n for op, n in counted.items() if str(op) in ("aten.mm", "aten.addmm"))
    dense = token_flops(shape, length)
    expected = step_flops(shape, length, counts, 0.5, 0.0, tokens="unlabelled") / 3
    expected -= counts[0] * dense.lm_head + sum(counts) * dense.attn_core  # the head runs apart; SDPA is not counted
    assert mm == pytest.approx(expected)
    # every token sparse, and dense: the two ends of the same model
    assert step_flops(shape, length, counts, 0.5, 0.0, tokens="all") < step_flops(shape, length, counts, 0.5, 0.0,
                                                                                  tokens="unlabelled")
    assert step_flops(shape, length, counts) == pytest.approx(
        3 * (sum(counts) * (dense.forward - dense.lm_head) + counts[0] * dense.lm_head))


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_lora_training_flops_match_an_independent_count_of_forward_and_backward(rate: float) -> None:
    """A frozen base with rank-r adapters on every projection: the matrix products of forward
    and backward as torch counts them equal the FLOP model's (no weight gradient for the base,
    its input gradient still; the adapters' three passes), dense and with SAT's kept neurons."""
    from dataclasses import replace

    from satrun.config import AdapterConfig
    from satrun.models.adapters import add_adapters
    from satrun.perf.plan import adapter_parameters

    base = tiny(4, 4)
    model = add_adapters(base, AdapterConfig(name="lora", r=8), None)
    for p in base.model.embed_tokens.parameters():
        p.requires_grad_(True)  # the FLOP model counts every layer's input gradient; with a frozen embedding torch
        # skips the first layer's (1/layers of the base's backward): a small overcount the model accepts
    if rate:
        sat = Sparsifier(model, MetricConfig(name="random"), SelectorConfig(fill="zero"))
        sat.set_rates(rate, rate, step=0)
    shape = replace(Shape.from_config(base.config), lora_rank=8)
    assert adapter_parameters(shape) == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    ids = torch.randint(0, 97, (2, SEQ))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.float().sum().backward()
    mm = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm")) / ids.numel()
    ours = token_flops(shape, SEQ, rate, rate)
    assert mm == pytest.approx(ours.train - 3 * ours.attn_core, rel=1e-6)  # SDPA's kernel is not counted on CPU
    full = token_flops(Shape.from_config(base.config), SEQ, rate, rate)
    assert ours.train < full.train  # no weight gradient for the base


@pytest.mark.parametrize("tokens, rate", [("unlabelled", 0.5), ("unlabelled", 1.0), ("all", 0.75)])
def test_backward_omission_flops_match_an_independent_count_of_forward_and_backward(tokens: str, rate: float) -> None:
    """``omit=backward``: the decoder's matrix products over a forward and its backward, as
    counted by torch, equal the FLOP model's (the forward dense, the sparse tokens' MLP backward
    on the kept channels, none at rate 1)."""
    from satrun.data.batches import token_counts
    from satrun.perf.flops import step_flops

    model = tiny(4, 2)
    batch = packed_batch()
    counts = token_counts(batch)
    shape, length = Shape.from_config(model.config), batch["input_ids"].shape[1]
    sat = Sparsifier(model, MetricConfig(name="random"), SelectorConfig(), tokens=tokens, omit="backward")
    sat.set_rates(rate, 0.0, step=0)
    sat.set_token_rows(batch["loss_rows"], batch["free_rows"])
    with FlopCounterMode(display=False) as counter:
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        hidden.last_hidden_state.square().sum().backward()
    mm = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    dense = token_flops(shape, length)
    expected = step_flops(shape, length, counts, rate, 0.0, tokens=tokens, omit="backward")
    expected -= counts[0] * dense.head_train + 3 * sum(counts) * dense.attn_core  # the head runs apart; SDPA is not counted
    assert mm == pytest.approx(expected)
    # the forward form at the same rate saves more; a backward omission saves at most two thirds of the MLP
    if rate < 1.0:
        assert step_flops(shape, length, counts, rate, 0.0, tokens=tokens) < step_flops(
            shape, length, counts, rate, 0.0, tokens=tokens, omit="backward")
    sparse_n = sum(counts) - (counts[0] if tokens == "unlabelled" else 0)
    assert step_flops(shape, length, counts) - step_flops(shape, length, counts, 1.0, 0.0, tokens=tokens, omit="backward") \
        == pytest.approx(2 * sparse_n * dense.mlp)
