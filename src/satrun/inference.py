"""Weights for inference (satrun generate, satrun eval, a run's samples): which folder a
``generate.run`` / ``eval.run`` names, the model and tokenizer loaded from it, the prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from satrun.config import TrainConfig
from satrun.errors import UsageError
from satrun.models import load_model, load_tokenizer
from satrun.models.adapters import ADAPTER_FOLDER, is_adapter_folder, load_adapted
from satrun.training import checkpoint


def inference_model(cfg: TrainConfig, run: str | None, key: str) -> tuple[Path | None, Any, Any]:
    """(folder, tokenizer, model in float32 on the CPU) for generate and eval: the weights
    ``run`` names (see :func:`weights_from`), else the configured model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = weights_from(run, key)
    if folder is None:
        tokenizer = load_tokenizer(cfg.model)
        return None, tokenizer, load_model(cfg.model, tokenizer)
    try:
        if is_adapter_folder(folder):  # the base its config names, with the adapters (peft)
            tokenizer, model = load_adapted(folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{key}={run}: cannot load a model from {folder}: {reason}") from exc
    return folder, tokenizer, model


def weights_from(run: str | None, key: str) -> Path | None:
    """A Hugging Face folder from generate.run: a run folder's final/ (else its newest
    checkpoint), or the folder given; a LoRA checkpoint's or the folder's adapter (peft's
    format, applied to the base it names); None for the configured model."""
    if run is None:
        return None
    path = Path(run).expanduser()
    if (path / "final" / "config.json").is_file():
        return path / "final"
    if not (path / "config.json").is_file() and not is_adapter_folder(path):
        found = checkpoint.checkpoints_in(path / "checkpoints") or checkpoint.checkpoints_in(path)
        if not found and not (path / checkpoint.STATE_FILE).is_file():
            raise UsageError(f"{key}={run}: no final/ model, checkpoint or Hugging Face folder there")
        path = found[-1] if found else path
    if (path / checkpoint.SHARDS).is_dir():
        raise UsageError(f"{key}={run}: {path} holds FSDP2 shards, not a model folder; use the run's final/")
    if not (path / "config.json").is_file() and is_adapter_folder(path / ADAPTER_FOLDER):
        path = path / ADAPTER_FOLDER  # a LoRA run's checkpoint: its adapters
    if not (path / "config.json").is_file() and not is_adapter_folder(path):
        raise UsageError(f"{key}={run}: {path} is not a Hugging Face model folder")
    return path


def read_prompts(prompt: list[str], prompt_file: str | None) -> list[str]:
    if prompt_file is None:
        if not prompt or not all(isinstance(p, str) and p.strip() for p in prompt):
            raise UsageError("generate.prompt needs one or more non-empty prompts")
        return list(prompt)
    path = Path(prompt_file).expanduser()
    if not path.is_file():
        raise UsageError(f"generate.prompt_file={prompt_file}: no such file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"generate.prompt_file={prompt_file}: no prompts in it (one per line)")
    return lines
