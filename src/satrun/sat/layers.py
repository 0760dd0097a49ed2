"""Which models the sparse path computes exactly, and what it needs of them, resolved once when a
layer is patched: the decoder layers, the supported attention and MLP classes, each
projection's peft LoRA adapter, and the model family's transformers attention functions."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from satrun.sat.sparse_ops import gathered_linear


class UnsupportedModel(ValueError):
    """The model's layers are not of the Llama family (Llama, Mistral, Qwen2, ...)."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    if hasattr(model, "get_base_model"):  # a peft model: the transformers model it adapts
        model = model.get_base_model()
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UnsupportedModel(f"{type(model).__name__}: no decoder layers at model.layers")
    return layers


# Attention and MLP classes whose forward the sparse path reproduces exactly. Others (q/k norms,
# logit soft-capping, QKV clipping, other activations) would silently compute something else.
SUPPORTED_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
SUPPORTED_MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}


def check_layer(layer: torch.nn.Module, index: int) -> tuple[dict[str, Optional["Lora"]], "AttentionInternals"]:
    """Refuse a layer the sparse path would not compute exactly; else its projections' LoRA
    adapters (None: a plain projection) and its attention's transformers functions."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(attn).__name__ not in SUPPORTED_ATTENTION or type(mlp).__name__ not in SUPPORTED_MLP:
        raise UnsupportedModel(
            f"layer {index}: {type(attn).__name__}/{type(mlp).__name__} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ATTENTION))} with their MLPs)"
        )
    probe = torch.linspace(-4, 4, 17)
    is_silu = torch.allclose(mlp.act_fn(probe), F.silu(probe))
    if not is_silu or base_linear(mlp.gate_proj).bias is not None:
        raise UnsupportedModel(f"layer {index}: only SiLU-gated MLPs without bias are supported")
    adapters = {f"{part}.{name}": resolve_lora(layer.get_submodule(f"{part}.{name}"), f"layer {index} {part}.{name}")
                for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                    ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names}
    return adapters, attention_internals(attn)


@dataclass(frozen=True)
class AttentionInternals:
    """The functions of the model family's transformers module that the sparse attention calls."""

    apply_rotary_pos_emb: Any
    eager_attention_forward: Any


def attention_internals(attn: torch.nn.Module) -> AttentionInternals:
    """Looked up once, where the attention class is defined (each family has its own copies);
    a transformers release that moves them is one clear error rather than a failure mid-step."""
    import transformers

    module = sys.modules[type(attn).__module__]
    missing = [name for name in ("apply_rotary_pos_emb", "eager_attention_forward") if not hasattr(module, name)]
    if missing:
        raise UnsupportedModel(f"{module.__name__} (transformers {transformers.__version__}) has no {', '.join(missing)}, "
                               "which the sparse attention calls; use the transformers release in constraints.txt")
    return AttentionInternals(module.apply_rotary_pos_emb, module.eager_attention_forward)


def base_linear(linear: torch.nn.Module) -> torch.nn.Module:
    """The projection's own linear layer: itself, or the base layer a peft adapter wraps."""
    return getattr(linear, "base_layer", linear)


@dataclass(frozen=True)
class Lora:
    """A projection's LoRA adapter as resolved when its layer is patched: the A and B modules
    (their weights are read at each use: FSDP2 replaces parameters when it wraps the model)."""

    a: torch.nn.Module
    b: torch.nn.Module
    scale: float
    dropout: torch.nn.Module


def lora_of(linear: torch.nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor, float, Any]]:
    """(A, B, scaling, dropout) of a patched layer's LoRA projection, or None for a plain one."""
    lora = getattr(linear, "_sat_lora", None)
    return None if lora is None else (lora.a.weight, lora.b.weight, lora.scale, lora.dropout)


def resolve_lora(linear: torch.nn.Module, where: str) -> Optional[Lora]:
    """A peft LoRA projection's adapter, or None for a plain one. An adapter layout the sparse
    path does not compute exactly (several active adapters, merged weights, DoRA, adapter
    biases, other adapter kinds) is an error, not a silent fallback."""
    if not hasattr(linear, "base_layer"):
        return None
    active = list(getattr(linear, "active_adapters", []))
    if not hasattr(linear, "lora_A") or len(active) != 1 or active[0] not in linear.lora_A:
        raise UnsupportedModel(f"{where}: SAT computes one active LoRA adapter per projection ({type(linear).__name__}, "
                               f"active {active})")
    name = active[0]
    if linear.merged or linear.use_dora.get(name) or (getattr(linear, "lora_bias", {}) or {}).get(name) \
            or linear.lora_B[name].bias is not None:
        raise UnsupportedModel(f"{where}: SAT computes plain LoRA adapters (not merged, no DoRA, no adapter bias)")
    return Lora(linear.lora_A[name], linear.lora_B[name], float(linear.scaling[name]), linear.lora_dropout[name])


def sparse_linear(linear: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, dim: int, regather: bool) -> torch.Tensor:
    """The projection restricted to output rows ``idx`` (dim 0) or to input columns ``idx`` (dim
    1, ``x`` holding only those features), its LoRA branch restricted alike: the kept rows of B,
    or the kept columns of A. The base weight's slice gets no gradient when it is frozen."""
    base = base_linear(linear)
    y = gathered_linear(x, base.weight, base.bias, idx, dim, regather)
    lora = lora_of(linear)
    if lora is None:
        return y
    a, b, scale, dropout = lora
    if dim == 0:
        branch = F.linear(F.linear(dropout(x), a), b.index_select(0, idx))
    else:
        branch = F.linear(F.linear(dropout(x), a.index_select(1, idx)), b)
    return y + scale * branch.to(y.dtype)
