"""Tiny randomly initialised models of each supported architecture, in fp32."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=64,
              attn_implementation="sdpa")

ARCHITECTURES = {
    "llama-mha": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, num_attention_heads=6, num_key_value_heads=2)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, num_attention_heads=6, num_key_value_heads=3)),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]().float()
    if name == "qwen2":  # q/k/v biases start at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model.train()


def assert_bf16_close_to_reference(model: torch.nn.Module, reference: torch.nn.Module, hooks, **inputs) -> None:  # type: ignore[no-untyped-def]
    """Under CPU bf16 autocast, the sparse ``model``'s loss and fp32 gradients against the dense
    ``reference`` with ``hooks()`` (masks that reproduce the model's last selection, installed
    after the model's forward and removed after the reference's): the loss within 1%, each
    gradient within 5% of its norm, and no gradient where the reference has none (frozen)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    handles = hooks()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = reference(**inputs).loss
    ref_loss.backward()
    for h in handles:
        h.remove()
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * ref_loss.item()
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        if ref.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert (p.grad - ref.grad).norm() <= 0.05 * ref.grad.norm() + 1e-6, name
