"""Turn a :class:`ModelConfig` into a transformers causal LM and its tokenizer."""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from satrun.config import ModelConfig
from satrun import hub
from satrun.errors import UsageError
from satrun.models.packaged import packaged_model_dir


def _location(cfg: ModelConfig) -> str:
    if cfg.source == "packaged":
        return str(packaged_model_dir())
    assert cfg.path, "validated in config"
    return cfg.path


def _missing(cfg: ModelConfig, what: str, location: str, exc: Exception) -> UsageError:
    why = hub.prepare(location) or type(exc).__name__
    key = "model.tokenizer" if location == cfg.tokenizer else "model.path"
    return UsageError(f"cannot load {what} of model={cfg.name} from {location!r} ({why}): "
                      f"set {key} to a local Hugging Face folder, or a hub id where the hub is reachable")


def llama_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    """The transformers config of the sizes in ``cfg`` (the one place model.* sizes are read)."""
    try:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
    except Exception as exc:  # transformers' validators, e.g. hidden_size not a multiple of num_heads
        reason = [line.strip() for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
        raise UsageError(f"model={cfg.name}: these sizes make no model: {reason[0]}") from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the model, with a pad token (EOS when it has none)."""
    source = cfg.tokenizer if cfg.source == "random" and cfg.tokenizer else None
    location = source or (str(packaged_model_dir()) if cfg.source == "random" else _location(cfg))
    hub.prepare(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise _missing(cfg, "the tokenizer", location, exc) from exc
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of model={cfg.name} has no EOS token; CPT packing needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, empty: bool = False) -> PreTrainedModel:
    """The model in float32 on the CPU; the trainer moves it and sets up precision.

    ``empty``: the parameters are created on the meta device (no memory; buffers are real), for
    an FSDP2 start where each rank fills only its own shard afterwards (:func:`load_weights`).
    """
    if cfg.source == "random":
        if cfg.vocab_size is not None and cfg.vocab_size < len(tokenizer):
            raise UsageError(
                f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens "
                "(set model.vocab_size=null to use the tokenizer's)"
            )
        config = llama_config(cfg, cfg.vocab_size or len(tokenizer))
        config.bos_token_id, config.eos_token_id, config.pad_token_id = (
            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        with _parameters_on_meta(empty), _attention_kernel(cfg):
            if cfg.attn_implementation:
                config._attn_implementation = cfg.attn_implementation
            model = LlamaForCausalLM(config)
        return _tied(model) if empty else model
    location = _location(cfg)
    hub.prepare(location)
    kernel = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    try:
        with _attention_kernel(cfg):
            if empty:
                config = AutoConfig.from_pretrained(location)
                with _parameters_on_meta(True):
                    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kernel)
                return _tied(model)
            return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kernel)
    except (OSError, ValueError) as exc:
        raise _missing(cfg, "the weights", location, exc) from exc


@contextlib.contextmanager
def _attention_kernel(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    """transformers' refusal of an attention kernel this machine lacks (e.g. flash_attention_2
    without the flash-attn package, or without a GPU) as one line."""
    try:
        yield
    except (ImportError, ValueError) as exc:
        if not cfg.attn_implementation or "attention" not in str(exc).lower():
            raise
        first = str(exc).strip().splitlines()[0][:200]
        raise UsageError(f"model.attn_implementation={cfg.attn_implementation} cannot be used here: {first}") from None


def weights_folder(cfg: ModelConfig) -> Optional[Path]:
    """The safetensors folder the model's weights come from (None for a random model)."""
    return None if cfg.source == "random" else Path(_location(cfg))


def _tied(model: PreTrainedModel) -> PreTrainedModel:
    """Tie the weights again (outside the meta context): parameters replaced on their way to the
    meta device lose their ties."""
    model.tie_weights()
    return model


def _parameters_on_meta(empty: bool) -> contextlib.AbstractContextManager:
    """Parameters created on the meta device, buffers (e.g. rotary frequencies) computed as usual."""
    if not empty:
        return contextlib.nullcontext()
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def max_sequence_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embedding supports, if it says."""
    return getattr(model.config, "max_position_embeddings", None)


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the safetensors weights of a Hugging Face folder into ``model`` (with adapters: into
    its base), whose parameters
    may be FSDP2 shards: each process then reads only its own rows (torch.distributed.checkpoint's
    Hugging Face reader; without a process group it reads everything). Tied weights, saved
    once, are loaded once. Tensors transformers itself ignores on loading are ignored too: the
    per-layer ``rotary_emb.inv_freq`` buffers older Llama exports hold (Llama-2-7b-hf among
    them; the model computes its frequencies itself), ``position_ids``, and the model class's own
    ``_keys_to_ignore_on_load_unexpected``. Any other missing or unexpected tensor is an error."""
    import torch.distributed.checkpoint as dcp

    if not any(folder.glob("*.safetensors")):
        raise UsageError(f"{folder}: no .safetensors weights to load")
    from satrun.models.adapters import base_name, base_weights

    # named_parameters() lists a tied parameter once, under the name the checkpoint keeps; a
    # model with adapters loads its base (under the base's names), the adapters are its own
    state = base_weights(model)
    persistent = model.state_dict().keys()  # once: buffers the checkpoint holds (not e.g. rotary frequencies)
    state.update({base_name(name): b for name, b in model.named_buffers() if name in persistent})
    reader = dcp.HuggingFaceStorageReader(str(folder))
    try:
        stored = set(reader.read_metadata().state_dict_metadata)
    except Exception as exc:
        raise UsageError(f"{folder}: the weights cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from exc
    ignored = _ignored_on_load(model)
    missing = sorted(set(state) - stored)
    unexpected = sorted(k for k in stored - set(state) - _tied_aliases(model) if not ignored.search(k))
    if missing or unexpected:
        raise UsageError(f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with warnings.catch_warnings():  # one process: DCP says it reads everything itself, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=reader, no_dist=not _distributed())
        except Exception as exc:  # a damaged file: safetensors, DCP and torch raise many kinds
            raise UsageError(f"{folder}: the weights cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from exc


def _ignored_on_load(model: torch.nn.Module) -> "re.Pattern[str]":
    """Stored tensor names that loading skips, as transformers' from_pretrained skips them."""
    patterns = {r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$"}
    patterns |= set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return re.compile("|".join(f"({p})" for p in sorted(patterns)))


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names under which a tied parameter appears a second time (e.g. lm_head.weight)."""
    from satrun.models.adapters import base_name

    every = dict(model.named_parameters(remove_duplicate=False))
    return {base_name(name) for name in set(every) - {name for name, _ in model.named_parameters()}}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
