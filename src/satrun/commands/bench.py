"""``satrun bench``: dense and SAT training steps timed side by side on real batches."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from satrun.config import TrainConfig, sparse_tokens
from satrun.data import BatchStream, pack_chats
from satrun.inputs import load_inputs
from satrun.models.adapters import add_adapters
from satrun.perf.bench import print_bench, run_bench
from satrun.perf.flops import Shape
from satrun.plots import speedup_plot
from satrun.sat import Sparsifier
from satrun.sparsity import adapted_shape, first_stage_layer_rates
from satrun.training import runtime
from satrun.training.optim import build_optimizer


def run(cfg: TrainConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Dense and SAT training steps timed side by side on real batches; writes bench.json. In
    SFT with packing the first row is the dense step on the same chats unpacked, head everywhere."""
    t = cfg.trainer
    packed_sft = cfg.mode.name == "sft" and cfg.data.packing
    _, model, corpus = load_inputs(replace(cfg, data=replace(cfg.data, packing=False)) if packed_sft else cfg)
    model = add_adapters(model, cfg.adapter, None)  # every row then trains the adapters alone
    device = runtime.resolve_device(t.device)
    model.to(device)
    if t.activation_checkpointing:
        runtime.enable_activation_checkpointing(model)
    if t.compile:  # each row's first (untimed) step compiles its shapes
        runtime.compile_layers(model)

    def batches_of(examples: list) -> list[dict[str, torch.Tensor]]:
        stream = BatchStream(examples, t.micro_batch_size, corpus.pad_id, t.seed)
        return [{k: v.to(device) for k, v in next(stream).items()} for _ in range(cfg.bench.steps + 1)]

    batches = batches_of(pack_chats(corpus.train, t.seq_len) if packed_sft else corpus.train)
    sparsifier = Sparsifier(model, cfg.metric, cfg.selector, cfg.scheduler.layers, seed=t.seed, tokens=sparse_tokens(cfg))
    dtype = runtime.resolve_precision(t.precision, device)
    amp = runtime.autocast(device, dtype)
    bench = cfg.bench if cfg.adapter.name == "none" else replace(cfg.bench, backward_rates=[])  # omit=backward: no adapters yet
    rows = run_bench(model, build_optimizer(model, cfg.optim), sparsifier, batches, bench,
                     adapted_shape(cfg, Shape.from_config(model.config)), device, amp, cfg.optim.grad_clip,
                     t.peak_flops or runtime.peak_flops(device, dtype),
                     first_stage_layer_rates(cfg), cfg.scheduler.heads_rate(),
                     padded_batches=batches_of(corpus.train) if packed_sft else None, layer_omit=cfg.scheduler.omit)
    out = run_dir / "bench.json"
    out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    speedup_plot(rows, run_dir / "bench.png", f"satrun bench: {cfg.model.name}, {cfg.mode.name}, {device.type}, "
                                              f"seq {t.seq_len} x {t.micro_batch_size}")
    print_bench(rows)
    print(f"bench written to {out} and {out.with_suffix('.png').name}")
    return rows
