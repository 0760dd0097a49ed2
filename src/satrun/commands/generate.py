"""``satrun generate``: text from a run's model or any configured model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import set_seed

from satrun.config import TrainConfig
from satrun.generation import describe, generate_texts, uses_chat
from satrun.inference import inference_model, read_prompts
from satrun.training import runtime


def run(cfg: TrainConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Text from a trained (or any configured) model for each prompt, streamed to the terminal
    and written to generations.jsonl."""
    g = cfg.generate
    prompts = read_prompts(g.prompt, g.prompt_file)
    set_seed(cfg.trainer.seed)
    device = runtime.resolve_device(cfg.trainer.device)
    folder, tokenizer, model = inference_model(cfg, g.run, "generate.run")
    model.to(device)
    chat = uses_chat(g, tokenizer)
    amp = runtime.precision_context(cfg.trainer.precision, device)
    results = generate_texts(model, tokenizer, prompts, g, device, amp, echo=True)
    out_file = run_dir / "generations.jsonl"
    out_file.write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
    print(f"\ngenerations written to {out_file} (model: {folder or cfg.model.name}, {describe(g, chat)})")
    return results
