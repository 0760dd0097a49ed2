"""The packaged SmolLM2-135M knows its Bible: it scores above chance (one in four) on the verse
cloze, through the same harness call `satrun eval` makes."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_smollm2_scores_above_chance_on_the_bible_cloze() -> None:
    from satrun.config import EvalConfig, ModelConfig
    from satrun.evaluation import evaluate, scores
    from satrun.models import load_model, load_tokenizer

    config = ModelConfig()
    assert config.name == "smollm2-135m"
    tokenizer = load_tokenizer(config)
    model = load_model(config, tokenizer)
    questions = 48
    results = evaluate(model, tokenizer, EvalConfig(tasks=["bible_cloze"], limit=questions), seed=1234, progress=False)
    found = scores(results)
    assert results["n-samples"]["bible_cloze"]["effective"] == questions
    # chance is 0.25 with a standard deviation of 0.0625 over 48 questions: demand 2.5 of them more
    # (a chance scorer passes one time in 160)
    assert found["bible_cloze/acc_norm"] > 0.25 + 2.5 * 0.0625, found
    assert found["bible_cloze/acc"] > 0.25 + 2.5 * 0.0625, found
