"""Parameter-efficient fine-tuning: LoRA adapters through peft, beside the model loading.

``add_adapters`` wraps a transformers model in a ``peft.PeftModel`` whose LoRA weights alone
require gradients; the base weights stay frozen (and bit-identical). The adapters are saved
and loaded in peft's own format (``adapter_config.json``, ``adapter_model.safetensors``), so a
``final/adapter`` folder loads with ``PeftModel.from_pretrained`` onto the base model its
config names, and ``save_merged`` writes the base with the adapters folded in as a plain
Hugging Face folder.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from satrun.config import AdapterConfig, ModelConfig
from satrun.errors import UsageError

ADAPTER_FOLDER = "adapter"  # inside final/ and each checkpoint
BASE_FOLDER = "base"  # inside final/, for a random base model: the base the adapter applies to


def weights_source(cfg: ModelConfig, run_dir: Path) -> str:
    """Where the base weights come from, for the adapter's config: the model folder or hub id,
    or for a random model the copy of it the run writes into final/base."""
    if cfg.source == "random":
        return str((run_dir / "final" / BASE_FOLDER).resolve())
    if cfg.source == "packaged":
        from satrun.models.packaged import packaged_model_dir

        return str(packaged_model_dir())
    assert cfg.path, "validated in config"
    return cfg.path


def add_adapters(model: PreTrainedModel, cfg: AdapterConfig, base: Optional[str]) -> torch.nn.Module:
    """``model`` with LoRA adapters on ``cfg.target_modules`` (``cfg.name == "none"``: unchanged).
    ``base``: where the base weights come from (a folder or hub id), written into
    adapter_config.json so the saved adapter names its base model."""
    if cfg.name == "none":
        return model
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(cfg.target_modules) - present)
    if missing:
        raise UsageError(f"adapter.target_modules: {missing} are not modules of this model "
                         f"(its projections: {', '.join(sorted(p for p in present if p.endswith('_proj')))})")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a question transformers 5 renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = get_peft_model(model, config)
    if base is not None:  # peft takes the model's own name_or_path, which a random model lacks
        adapted.peft_config["default"].base_model_name_or_path = base
    return adapted


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_adapters(model: torch.nn.Module, folder: Path) -> None:
    """The adapter weights and their config (peft's format) into ``folder``."""
    # the embeddings are not adapted: no need for peft to look for the base's vocabulary
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)


def load_adapters(model: torch.nn.Module, folder: Path) -> None:
    """Adapter weights saved by :func:`save_adapters` into ``model`` (its adapters replaced)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise UsageError(f"{folder}: no adapter_model.safetensors to resume the adapters from")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    if getattr(result, "unexpected_keys", None):
        raise UsageError(f"{folder}: adapter weights do not match the model (unexpected {result.unexpected_keys[:3]})")


def save_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The base model with the adapters folded into its weights, as a plain Hugging Face folder
    (from a copy: the model keeps training, sampling or generating with its adapters)."""
    from satrun.training.saving import write_hf_folder

    merged = copy.deepcopy(model).merge_and_unload()
    write_hf_folder(merged, tokenizer, folder)


def save_base(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The base model without its adapters (a random base exists nowhere else)."""
    from satrun.training.saving import write_hf_folder

    write_hf_folder(copy.deepcopy(model).unload(), tokenizer, folder)
