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
