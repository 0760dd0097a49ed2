"""satrun.evaluation.evaluate on a model in training: a SAT model is scored dense (eval mode,
restored after), and the generators the harness seeds are left as they were."""

from __future__ import annotations

import random

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from satrun.config import EvalConfig
from satrun.evaluation import evaluate, scores
from satrun.sat import Sparsifier

CONFIG = EvalConfig(tasks=["bible_cloze"], limit=6, batch_size=4)


def tiny(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")).train()


def test_a_sat_model_in_training_is_scored_dense_and_its_random_state_kept(tokenizer) -> None:
    model = tiny(len(tokenizer))
    dense = evaluate(model, tokenizer, CONFIG, seed=1, progress=False)
    sat = Sparsifier(model)
    sat.set_rates(0.5, 0.5, step=0)  # a training forward would now omit half the neurons
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    sparse_model = evaluate(model, tokenizer, CONFIG, seed=1, progress=False)
    assert model.training  # restored
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.random.get_rng_state(), before[2])
    assert scores(sparse_model) == scores(dense)
    assert all(v is None for layer in range(2) for v in sat.last_selection(layer).values())  # no sparse forward ran
    ids = torch.tensor([tokenizer("In the beginning God created")["input_ids"]])
    with torch.no_grad():
        model(input_ids=ids)
    assert sat.last_selection(0)["channels"] is not None  # in training mode the same model computes sparsely
    sat.remove()


def test_chat_template_renders_the_questions_through_the_tokenizers_template(tokenizer, monkeypatch) -> None:
    model = tiny(len(tokenizer))
    rendered = []
    original = type(tokenizer).apply_chat_template

    def counted(self, *args, **kwargs):  # the tokenizer's own template, its uses counted
        rendered.append(args[0] if args else kwargs.get("conversation"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "apply_chat_template", counted)
    evaluate(model, tokenizer, EvalConfig(tasks=["chatterbot_mc"], limit=2), seed=1, progress=False)
    assert not rendered
    evaluate(model, tokenizer, EvalConfig(tasks=["chatterbot_mc"], limit=2, chat_template=True), seed=1, progress=False)
    assert rendered and any("Question:" in str(chat) for chat in rendered)
