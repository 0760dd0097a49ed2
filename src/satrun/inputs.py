"""The inputs of a command that trains or measures training: the seeded tokenizer, model and data."""

from __future__ import annotations

import logging

from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from satrun.config import TrainConfig
from satrun.data import Corpus, build_corpus
from satrun.errors import UsageError
from satrun.models import load_model, load_tokenizer, max_sequence_length
from satrun.training import distributed, runtime


def load_inputs(cfg: TrainConfig, empty: bool = False) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, Corpus]:
    """Seeded tokenizer, model (CPU, fp32; ``empty``: parameters on the meta device, to be
    filled later) and data, after the checks that need no data."""
    # also fails on a bad device before loading; several CPU ranks keep glibc's default: there
    # each thread's arena retains its freed memory and an FSDP2 rank grows by half (fsdp_memory.py)
    if runtime.resolve_device(cfg.trainer.device).type == "cpu" and distributed.current().size == 1:
        if not runtime.keep_freed_host_memory():
            logging.getLogger("satrun").info("host allocator not tuned (needs glibc): CPU steps may fault their memory in afresh")
    set_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, empty=empty)
    limit = max_sequence_length(model)
    if limit is not None and cfg.trainer.seq_len > limit:
        raise UsageError(f"trainer.seq_len={cfg.trainer.seq_len} exceeds model={cfg.model.name}'s maximum of {limit} positions")
    corpus = build_corpus(cfg.data, cfg.mode.name, tokenizer, cfg.trainer.seq_len, cfg.trainer.micro_batch_size,
                          cfg.trainer.seed, cfg.mode.train_on_inputs)
    return tokenizer, model, corpus
