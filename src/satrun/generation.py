"""Text from a causal LM for a list of prompts: what `satrun generate` prints and what a
training run with ``trainer.sample_every`` writes into samples.jsonl."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from satrun.config import GenerateConfig
from satrun.errors import UsageError


def uses_chat(g: GenerateConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether prompts go through the tokenizer's chat template (generate.chat)."""
    chat = g.chat == "on" or (g.chat == "auto" and bool(tokenizer.chat_template))
    if chat and not tokenizer.chat_template:
        raise UsageError("generate.chat=on but the tokenizer has no chat template (use generate.chat=off)")
    return chat


def describe(g: GenerateConfig, chat: bool) -> str:
    sampling = "greedy" if g.temperature == 0 else f"temperature {g.temperature}, top_p {g.top_p}"
    return f"{sampling}, chat template {'on' if chat else 'off'}"


def generate_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], g: GenerateConfig,
                   device: torch.device, amp: Any = None, echo: bool = False) -> list[dict[str, Any]]:
    """One continuation per prompt, by the model in eval mode (restored after); ``echo``
    prints each prompt and streams its continuation (generate.stream) to the terminal.
    Sampling (generate.temperature > 0) draws from torch's generators forked for the call,
    so the caller's random state, and a training run's reproducibility, are untouched."""
    from transformers import TextStreamer

    chat = uses_chat(g, tokenizer)
    sampling = {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p} if g.temperature > 0 else {"do_sample": False}
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                (amp or contextlib.nullcontext()):
            for prompt in prompts:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True) if chat else prompt
                inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
                streamer = None
                if echo:
                    print(f"\n>>> {prompt}", flush=True)
                    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if g.stream else None
                out = model.generate(**inputs, max_new_tokens=g.max_new_tokens, streamer=streamer,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
                answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                if echo and streamer is None:
                    print(answer, flush=True)
                results.append({"prompt": prompt, "output": answer, "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1])})
    finally:
        model.train(was_training)
    return results
