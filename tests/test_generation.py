"""Generation for `satrun generate` and trainer.sample_every: it leaves the caller's state alone."""

from __future__ import annotations

import torch

from satrun.config import GenerateConfig, ModelConfig
from satrun.generation import generate_texts
from satrun.models import load_model, load_tokenizer


def test_sampling_leaves_the_random_state_and_the_training_mode_as_they_were() -> None:
    cfg = ModelConfig(name="tiny", source="random")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer).train()
    before = torch.get_rng_state()
    results = generate_texts(model, tokenizer, ["Hello", "The sea"], GenerateConfig(max_new_tokens=3, temperature=1.0),
                             torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert [r["prompt"] for r in results] == ["Hello", "The sea"] and all(0 < r["new_tokens"] <= 3 for r in results)
