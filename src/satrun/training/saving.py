"""Writing Hugging Face model folders that are either complete or absent."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

from transformers import PreTrainedModel, PreTrainedTokenizerBase


def write_hf_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, state_dict: Optional[dict] = None
) -> Path:
    """safetensors + config + tokenizer into ``folder`` (not atomic by itself); ``state_dict``
    replaces the model's own tensors (e.g. weights gathered from FSDP shards)."""
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def save_hf_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, state_dict: Optional[dict] = None
) -> Path:
    """safetensors + config + tokenizer, written beside ``target`` and renamed into place.

    A crash mid-write leaves only a hidden temporary folder, never a half-written ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_hf_folder(model, tokenizer, staging, state_dict)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
