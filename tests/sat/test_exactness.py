"""The sparse computation is exact: it equals a dense model whose omitted neurons output zero."""

from __future__ import annotations

import copy

import pytest
import torch

from satrun.training.runtime import enable_activation_checkpointing
from satrun.sat.selection import kept_heads
from satrun.sat.settings import MetricConfig, SelectorConfig
from satrun.sat.sparsifier import Sparsifier
from tests.sat.models import ARCHITECTURES, assert_bf16_close_to_reference, build

TOL = 1e-5


def batch(vocab: int = 97, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    return ids, ids.clone()


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return out.logits.detach(), grads


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.2e}"


def masked_reference(model: torch.nn.Module, keep: dict[int, dict[str, torch.Tensor]]) -> list:
    """Hooks that zero omitted channels' activations and omitted heads' outputs in a dense model
    (and add the omitted channels' mean output, a constant, where the selection filled it)."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        channels, heads = keep[i]["channels"], keep[i]["heads"]
        if keep[i].get("fill") is not None:
            fill = keep[i]["fill"].detach().clone()
            handles.append(layer.mlp.register_forward_hook(lambda m, a, out, fill=fill: out + fill))
        if channels is not None:
            mask = torch.zeros(layer.mlp.gate_proj.out_features)
            mask[channels] = 1.0
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
        if heads is not None:
            d = layer.self_attn.head_dim
            mask = torch.zeros(layer.self_attn.o_proj.in_features // d)
            mask[heads] = 1.0
            mask = mask.repeat_interleave(d)
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
    return handles


def assert_matches_masked_reference(reference: torch.nn.Module, keep: dict, ids: torch.Tensor, labels: torch.Tensor,
                                    logits: torch.Tensor, grads: dict) -> None:
    """The sparse model's logits and gradients equal the dense reference with the same neurons masked."""
    handles = masked_reference(reference, keep)
    ref_logits, ref_grads = loss_and_grads(reference, ids, labels)
    for h in handles:
        h.remove()
    assert_close(logits, ref_logits, "logits")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], name)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_rate_zero_equals_unmodified_model(arch: str) -> None:
    plain = build(arch)
    sparse = copy.deepcopy(plain)
    sat = Sparsifier(sparse, seed=3)
    sat.set_rates(0.0, 0.0, step=0)
    ids, labels = batch()
    ref_logits, ref_grads = loss_and_grads(plain, ids, labels)
    logits, grads = loss_and_grads(sparse, ids, labels)
    assert_close(logits, ref_logits, "logits")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], name)


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "maxip", "random", "contrib"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_sparse_step_equals_masked_dense_reference(arch: str, metric: str) -> None:
    model = build(arch)
    reference = copy.deepcopy(model)
    sat = Sparsifier(model, MetricConfig(name=metric, token_stride=4), SelectorConfig(name="sampling"), seed=7)
    sat.set_rates(0.5, 0.5, step=11)
    ids, labels = batch()
    logits, grads = loss_and_grads(model, ids, labels)
    keep = {i: sat.last_selection(i) for i in range(len(model.model.layers))}
    for i, sel in keep.items():
        assert sel["channels"] is not None and sel["heads"] is not None
        assert sel["channels"].numel() == 40  # half of 80 channels
        n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
        assert sel["heads"].numel() == kept_heads(n_heads, n_kv, 0.5)
        if n_kv < n_heads:  # GQA: as many kept heads in every KV group
            per_group = torch.bincount(sel["heads"] // (n_heads // n_kv), minlength=n_kv)
            assert (per_group == per_group[0]).all()
    assert_matches_masked_reference(reference, keep, ids, labels, logits, grads)
    for i, layer in enumerate(model.model.layers):  # omitted neurons get exactly zero gradient
        omitted = torch.ones(layer.mlp.gate_proj.out_features, dtype=torch.bool)
        omitted[keep[i]["channels"]] = False
        assert layer.mlp.gate_proj.weight.grad[omitted].abs().max() == 0
        assert layer.mlp.up_proj.weight.grad[omitted].abs().max() == 0
        assert layer.mlp.down_proj.weight.grad[:, omitted].abs().max() == 0
        d = layer.self_attn.head_dim
        heads = torch.ones(layer.self_attn.q_proj.out_features // d, dtype=torch.bool)
        heads[keep[i]["heads"]] = False
        rows = heads.repeat_interleave(d)
        assert layer.self_attn.q_proj.weight.grad[rows].abs().max() == 0
        assert layer.self_attn.o_proj.weight.grad[:, rows].abs().max() == 0


def test_state_dict_unchanged_and_checkpoint_loads_in_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = build("llama-gqa")
    before = {k: v.shape for k, v in model.state_dict().items()}
    sat = Sparsifier(model)
    sat.set_rates(0.5, 0.5, step=0)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert {k: v.shape for k, v in model.state_dict().items()} == before
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, "reloaded logits")
    sat.remove()
    assert "forward" not in vars(model.model.layers[0].mlp)


def with_and_without_checkpointing(plain: torch.nn.Module) -> tuple[tuple, tuple]:
    """(logits, gradients) of one SAT step of ``plain`` and of a copy with activation checkpointing."""
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    ids, labels = batch()
    results = []
    for model in (plain, ckpt):
        sat = Sparsifier(model, seed=5)  # sampling: a re-drawn selection would change the gradients
        sat.set_rates(0.5, 0.5, step=2)
        results.append(loss_and_grads(model, ids, labels))
    assert_close(results[0][0], results[1][0], "logits")
    return results[0], results[1]


def test_activation_checkpointing_reuses_the_selection() -> None:
    plain, ckpt = with_and_without_checkpointing(build("llama-gqa"))
    for name in plain[1]:
        assert_close(plain[1][name], ckpt[1][name], name)


def test_non_llama_models_are_rejected() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from satrun.sat import UnsupportedModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModel):
        Sparsifier(model)


def test_a_transformers_release_without_the_attention_functions_is_one_clear_error(monkeypatch) -> None:
    """The sparse attention calls the model family's apply_rotary_pos_emb and
    eager_attention_forward: looked up once when the layers are patched, named if missing."""
    import sys

    from satrun.sat import UnsupportedModel

    model = build("llama-gqa")
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    monkeypatch.delattr(modeling, "apply_rotary_pos_emb")
    with pytest.raises(UnsupportedModel, match=r"has no apply_rotary_pos_emb.*constraints.txt"):
        Sparsifier(model)
    assert not hasattr(model.model.layers[0].self_attn, "_sat")  # nothing patched


def test_only_the_chosen_layers_are_sparsified() -> None:
    model = build("llama-gqa")
    sat = Sparsifier(model, layers=[1])
    sat.set_rates(0.5, 0.5, step=0)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert sat.last_selection(0) == {"channels": None, "heads": None, "fill": None}
    assert sat.last_selection(1)["channels"].numel() == 40


def test_eval_mode_is_dense() -> None:
    plain = build("llama-gqa")
    sparse = copy.deepcopy(plain)
    sat = Sparsifier(sparse)
    sat.set_rates(0.5, 0.5, step=0)
    ids, _ = batch()
    plain.eval(), sparse.eval()
    with torch.no_grad():
        assert_close(sparse(input_ids=ids).logits, plain(input_ids=ids).logits, "eval logits")
    assert sat.last_selection(0)["channels"] is None


def test_padded_batch_equals_masked_reference() -> None:
    model = build("llama-gqa")
    reference = copy.deepcopy(model)
    sat = Sparsifier(model, seed=1)
    sat.set_rates(0.5, 0.5, step=0)
    ids, labels = batch()
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # the second row is right-padded
    labels = labels.masked_fill(mask == 0, -100)

    def run(m: torch.nn.Module) -> tuple[torch.Tensor, dict]:
        m.zero_grad(set_to_none=True)
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    logits, grads = run(model)
    handles = masked_reference(reference, {i: sat.last_selection(i) for i in range(2)})
    ref_logits, ref_grads = run(reference)
    for h in handles:
        h.remove()
    valid = mask.bool()
    assert_close(logits[valid], ref_logits[valid], "logits on real tokens")
    for name, grad in ref_grads.items():
        assert_close(grads.get(name, torch.zeros_like(grad)), grad, name)


def test_bf16_autocast_on_cpu_matches_the_masked_reference_closely() -> None:
    model = build("qwen2")
    reference = copy.deepcopy(model)
    ids, labels = batch()
    sat = Sparsifier(model, seed=0)
    sat.set_rates(0.5, 0.5, step=0)
    assert_bf16_close_to_reference(model, reference, lambda: masked_reference(reference, {i: sat.last_selection(i) for i in range(2)}),
                                   input_ids=ids, labels=labels)


def test_frozen_weights_get_no_gradient() -> None:
    model = build("llama-mha")
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.requires_grad_(False)
    sat = Sparsifier(model)
    sat.set_rates(0.5, 0.5, step=0)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert all(layer.mlp.down_proj.weight.grad is None for layer in model.model.layers)
    assert all(layer.mlp.up_proj.weight.grad is not None for layer in model.model.layers)


@pytest.mark.parametrize("fill", ["zero", "mean"])
@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_per_layer_rates_equal_the_masked_reference(arch: str, fill: str) -> None:
    model = build(arch)
    reference = copy.deepcopy(model)
    sat = Sparsifier(model, MetricConfig(name="contrib", token_stride=3),
                     SelectorConfig(name="sampling", normalize="rank", fill=fill), seed=2)
    sat.set_rates([0.0, 0.75], 0.5, step=4)  # layer 0's MLP dense, layer 1 keeps a quarter of its channels
    ids, labels = batch()
    logits, grads = loss_and_grads(model, ids, labels)
    keep = {i: sat.last_selection(i) for i in range(2)}
    assert keep[0]["channels"] is None and keep[1]["channels"].numel() == 20
    assert keep[0]["heads"] is not None and keep[1]["heads"] is not None
    assert (keep[1]["fill"] is not None) == (fill == "mean") and keep[0]["fill"] is None
    assert_matches_masked_reference(reference, keep, ids, labels, logits, grads)
    with pytest.raises(ValueError, match="3 MLP rates"):
        sat.set_rates([0.5, 0.5, 0.5], 0.0, step=0)


def test_contrib_scores_are_output_contributions() -> None:
    """contrib on every token equals each channel's and head's output norm, computed the long way."""
    from satrun.sat import importance

    layer = build("llama-gqa").model.layers[0]
    x = torch.randn(10, 48)
    mlp, attn = layer.mlp, layer.self_attn
    act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    expected = torch.stack([(act[:, i:i + 1] * mlp.down_proj.weight[:, i]).norm() for i in range(80)])
    got = importance.channel_scores("contrib", x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, 1, None)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    d, v = attn.head_dim, attn.v_proj(x)
    heads = []
    for h in range(6):
        kv = h // 3
        out = v[:, kv * d:(kv + 1) * d] @ attn.o_proj.weight[:, h * d:(h + 1) * d].t()
        heads.append(out.norm())
    got = importance.head_scores("contrib", x, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                 attn.o_proj.weight, d, 1, None)
    assert torch.allclose(got, torch.stack(heads), rtol=1e-4, atol=1e-6)


def test_mean_fill_is_the_omitted_channels_mean_output() -> None:
    model = build("llama-mha")
    sat = Sparsifier(model, MetricConfig(name="wanda", token_stride=2), SelectorConfig(name="topk", fill="mean"))
    sat.set_rates(0.5, 0.0, step=0)
    ids, labels = batch()
    captured = {}
    model.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    model(input_ids=ids, labels=labels).loss.backward()
    mlp, sel = model.model.layers[1].mlp, sat.last_selection(1)
    x = captured["x"].reshape(-1, 48)[::2]
    act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    omitted = torch.ones(80, dtype=torch.bool)
    omitted[sel["channels"]] = False
    expected = mlp.down_proj.weight[:, omitted] @ act[:, omitted].mean(0)
    assert_close(sel["fill"], expected, "mean fill")


def test_the_mean_fill_keeps_no_low_precision_copy_of_the_down_projection() -> None:
    """Under bf16 autocast, a product with the fp32 weight would make autocast keep a bf16 copy
    of every sparsified layer's W_down until the forward ends. Live tensor bytes after the
    forward with the mean fill exceed those with no fill by far less than those copies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from satrun.perf.memory import TensorMemory

    live = {}
    for fill in ("zero", "mean"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=2048, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4)).train()
        sat = Sparsifier(model, MetricConfig(name="contrib", token_stride=1), SelectorConfig(name="topk", fill=fill), seed=0)
        sat.set_rates(0.5, 0.0, step=0)
        ids = torch.randint(0, 97, (1, 8))
        tracker = TensorMemory(torch.device("cpu"))
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids).logits.float().sum()
            live[fill] = tracker.live
        del loss
    copies = 2 * 64 * 2048 * 2  # bytes of two layers' bf16 W_down
    assert live["mean"] - live["zero"] < copies / 4, (live, copies)


def test_grouped_query_attention_reaches_the_kernel_grouped(monkeypatch) -> None:
    """Under GQA the sparse path hands SDPA the KV heads themselves (enable_gqa), as the dense
    path does, instead of a copy of K and V for every kept query head."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = build("llama-gqa")  # 6 query heads, 2 KV heads
    sat = Sparsifier(model, MetricConfig(name="random"), SelectorConfig(name="topk"), seed=0)
    sat.set_rates(0.5, 0.5, step=0)
    ids, labels = batch()
    model(ids, labels=labels).loss.backward()
    assert calls and all(c == (4, 2, True) for c in calls), calls  # 2 of 3 heads in each group
