"""Loading pre-trained weights shard by shard (the FSDP2 start) from Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from satrun.config import ModelConfig
from satrun.errors import UsageError
from satrun.models import load_model, load_weights
from satrun.training.distributed import materialize

TINY = ModelConfig(name="tiny", source="random", hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, vocab_size=None, tie_word_embeddings=False)


def _old_llama_export(tmp_path: Path, tokenizer, extra: dict[str, torch.Tensor]) -> tuple[Path, torch.nn.Module]:
    """A checkpoint as older Llama exports (e.g. Llama-2-7b-hf) wrote it: the model's weights
    plus tensors the model no longer has."""
    model = load_model(TINY, tokenizer)
    folder = tmp_path / "old"
    model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    weights.update(extra)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, model


def _loaded(folder: Path, tokenizer) -> torch.nn.Module:
    empty = load_model(TINY, tokenizer, empty=True)
    materialize(empty, torch.device("cpu"), lambda m: load_weights(m, folder))
    return empty


def test_the_rotary_frequencies_of_old_llama_exports_are_ignored_as_transformers_ignores_them(tmp_path, tokenizer):
    head_dim = TINY.hidden_size // TINY.num_heads
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(head_dim // 2) for i in range(TINY.num_layers)}
    folder, model = _old_llama_export(tmp_path, tokenizer, extra)
    loaded = _loaded(folder, tokenizer)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    ids = torch.randint(0, 100, (1, 8))
    assert torch.equal(model(ids).logits, loaded(ids).logits)  # its own frequencies, not the stored ones


def test_any_other_unexpected_tensor_is_still_an_error(tmp_path, tokenizer):
    folder, _ = _old_llama_export(tmp_path, tokenizer, {"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(UsageError, match="unexpected .*extra_proj"):
        _loaded(folder, tokenizer)


@pytest.mark.parametrize("kernel", ["eager"])  # flex_attention has no CPU backward
def test_the_attention_kernel_is_the_configured_one_dense_and_sparse(tokenizer, kernel):
    """model.attn_implementation reaches the model, and SAT's sparse attention calls the same
    kernel: dense and sparse logits equal sdpa's (the default)."""
    from dataclasses import replace

    from satrun.sat.settings import MetricConfig, SelectorConfig
    from satrun.sat.sparsifier import Sparsifier

    logits = {}
    for name in ("sdpa", kernel):
        torch.manual_seed(0)
        model = load_model(replace(TINY, attn_implementation=name), tokenizer)
        assert model.config._attn_implementation == name
        ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
        model.train()
        dense = model(ids).logits
        sat = Sparsifier(model, MetricConfig(name="random"), SelectorConfig(name="topk"), seed=3)
        sat.set_rates(0.5, 0.5, step=0)
        logits[name] = (dense, model(ids).logits)
    for got, want in zip(logits[kernel], logits["sdpa"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["sdpa"][0], logits["sdpa"][1])  # the sparse forward did omit


def test_an_attention_kernel_this_machine_lacks_is_one_line(tokenizer):
    from dataclasses import replace

    if torch.cuda.is_available():
        pytest.skip("flash-attn may be installed where a GPU is")
    with pytest.raises(UsageError, match="model.attn_implementation=flash_attention_2 cannot be used here"):
        load_model(replace(TINY, attn_implementation="flash_attention_2"), tokenizer)
