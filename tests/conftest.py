"""Shared fixtures: the real SmolLM2 tokenizer (with and without its chat template)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from satrun.config import ModelConfig  # noqa: E402
from satrun.models import load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (chat template included), as used by model=tiny."""
    tok = load_tokenizer(ModelConfig(name="tiny", source="random"))
    assert tok.chat_template, "the packaged SmolLM2 tokenizer is expected to carry a chat template"
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    return tok


@pytest.fixture(scope="session")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template: exercises the plain "User:/Assistant:" format."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert tokenizer.chat_template, "deepcopy must not touch the original"
    return tok
