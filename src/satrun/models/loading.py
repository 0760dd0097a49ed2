"""Turn a :class:`ModelConfig` into a transformers causal LM and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from satrun.config import ModelConfig
from satrun.errors import UsageError
from satrun.models.packaged import packaged_model_dir


def _location(cfg: ModelConfig) -> str:
    if cfg.source == "packaged":
        return str(packaged_model_dir())
    assert cfg.path, "validated in config"
    return cfg.path


def _missing(cfg: ModelConfig, what: str, exc: Exception) -> UsageError:
    path = cfg.path
    hint = "set model.path to a local Hugging Face folder (or a hub id where a hub is reachable)"
    return UsageError(f"cannot load {what} of model={cfg.name} from {path!r}: {hint} ({type(exc).__name__})")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the model, with a pad token (EOS when it has none)."""
    source = cfg.tokenizer if cfg.source == "random" and cfg.tokenizer else None
    location = source or (str(packaged_model_dir()) if cfg.source == "random" else _location(cfg))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise _missing(cfg, "the tokenizer", exc) from exc
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of model={cfg.name} has no EOS token; CPT packing needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The model in float32 on the CPU; the trainer moves it and sets up precision."""
    if cfg.source == "random":
        if cfg.vocab_size is not None and cfg.vocab_size < len(tokenizer):
            raise UsageError(
                f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens "
                "(set model.vocab_size=null to use the tokenizer's)"
            )
        config = LlamaConfig(
            vocab_size=cfg.vocab_size or len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        return LlamaForCausalLM(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(_location(cfg), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise _missing(cfg, "the weights", exc) from exc
    return model


def max_sequence_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embedding supports, if it says."""
    return getattr(model.config, "max_position_embeddings", None)


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the safetensors weights of a Hugging Face folder written by ``save_pretrained`` into
    ``model``. Tied weights (saved once) are the only keys allowed to be missing."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{folder}: no .safetensors weights to load")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [name for name in missing if not any(params.get(name) is params.get(other) for other in weights)]
    if untied or unexpected:
        raise UsageError(f"{folder}: weights do not match the model (missing {untied[:3]}, unexpected {unexpected[:3]})")
