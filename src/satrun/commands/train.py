"""``satrun train``: set up, train, save; the run folder's policy is :mod:`satrun.training.resume`."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from satrun.config import TrainConfig
from satrun.errors import DiskFull, Interrupted, OutOfMemory, UsageError
from satrun.generation import describe, generate_texts, uses_chat
from satrun.inference import read_prompts
from satrun.inputs import load_inputs
from satrun.models.adapters import (ADAPTER_FOLDER, BASE_FOLDER, add_adapters, is_adapted, save_adapters, save_base,
                                    save_merged, weights_source)
from satrun.models.weight_sources import weight_source
from satrun.training import checkpoint, distributed, launcher, runtime
from satrun.training import resume as resume_policy
from satrun.training.display import QuietDisplay, make_display, print_summary
from satrun.training.loggers import Fanout, build_loggers
from satrun.training.metrics import write_summary
from satrun.training.saving import remove_stale, write_hf_folder
from satrun.sparsity import StepFlopCounter, build_sparsity, describe_sparsity, stage_fields, token_rows_hooks
from satrun.training.run import EveryNSteps, RunIO
from satrun.training.trainer import StartState, StepHooks, train


def run(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train as configured, writing metrics.jsonl, summary.json and final/ into ``run_dir``.

    Under torch.distributed every rank runs this; the first one alone writes the run folder.
    With ``launcher=torchrun`` it starts the ranks itself and returns the first rank's summary.
    """
    if cfg.launcher.name == "torchrun" and "LOCAL_RANK" not in os.environ:
        return launcher.launch_ranks(cfg, run_dir, run)
    started = time.perf_counter()
    world = distributed.init_from_env()
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.main:  # what a kill during an earlier launch's write left behind
        remove_stale(run_dir)
        remove_stale(run_dir / "checkpoints")
    display = make_display(cfg.trainer.progress) if world.main else QuietDisplay()
    display.message(f"run folder: {run_dir}" + (f" ({world.size} ranks, {cfg.trainer.strategy})" if world.size > 1 else ""))
    start = resume_policy.agreed_start(cfg, run_dir, display.message, world.main)
    if start.finished is not None:
        display.message(f"resume=auto: the run in {run_dir} already finished ({start.finished['steps']} steps); nothing to do")
        return start.finished
    resume_from = start.checkpoint
    resume = checkpoint.load_state(resume_from) if resume_from is not None else None
    settings = resume_policy.settings(cfg, world.size)
    sharded = distributed.sharded_start(cfg.trainer.strategy, world)
    if resume is not None:
        checkpoint.check_resumable(resume, world.size, sharded)  # shards fit only their own rank count
        if not cfg.resume_allow_changes:
            resume_policy.check_unchanged(resume, settings)
    # a random model is built here and broadcast (with adapters: its base, which no checkpoint holds)
    random_here = (cfg.model.source == "random" and world.main
                   and (resume is None or cfg.adapter.name != "none"))
    tokenizer, model, corpus = load_inputs(cfg, empty=sharded and not random_here)
    model = add_adapters(model, cfg.adapter, weights_source(cfg.model, run_dir), seed=cfg.trainer.seed)
    display.message(
        f"model {cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
        + (f" ({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M of them LoRA adapters, "
           f"r={cfg.adapter.r}, the rest frozen)" if is_adapted(model) else "") + "; "
        f"data {cfg.data.name} ({cfg.mode.name}): {corpus.describe(cfg.trainer.seq_len)}"
    )
    fill = weight_source(cfg, model, resume, sharded)
    if resume is not None:
        display.message(f"resuming from {resume_from} (step {resume['run']['step']})")

    sparsity = build_sparsity(cfg, model)
    display.message(describe_sparsity(cfg, sparsity))
    if cfg.optim.warmup_steps > cfg.trainer.max_steps:
        display.message(f"warning: optim.warmup_steps={cfg.optim.warmup_steps} is longer than the run "
                        f"(trainer.max_steps={cfg.trainer.max_steps}): the learning rate never reaches optim.lr")
    keep_through = resume["run"]["step"] if resume else None
    callbacks = []
    if cfg.trainer.benchmark_every:
        callbacks.append(periodic_benchmark(cfg, model, tokenizer, world.size))
    samples = Samples(cfg, model, tokenizer, run_dir, keep_through, world.size) if cfg.trainer.sample_every else None
    if samples is not None:
        callbacks.append(EveryNSteps(cfg.trainer.sample_every, samples.write))
    if world.main:  # every check passed: from here on the run writes into its folder
        resume_policy.clear(start)
        if is_adapted(model) and cfg.model.source == "random":  # the base the saved adapters name
            save_base(model, tokenizer, run_dir / BASE_FOLDER)
    logger = build_loggers(cfg.logger, run_dir, asdict(cfg), keep_through) if world.main else Fanout([])

    def write_model(folder: Path) -> None:  # checkpoints: with adapters, only they (the base is the model's own)
        if is_adapted(model):
            save_adapters(model, folder / ADAPTER_FOLDER)
        else:
            write_hf_folder(model, tokenizer, folder)

    def write_final(folder: Path) -> None:  # with adapters: the merged model and the adapters
        if not is_adapted(model):
            write_hf_folder(model, tokenizer, folder)
            return
        save_merged(model, tokenizer, folder)
        save_adapters(model, folder / ADAPTER_FOLDER)

    io = RunIO(run_dir, display, logger, write_model, write_final, settings, started)
    hooks = StepHooks([sparsity], token_rows_hooks(sparsity.sparsifier), StepFlopCounter(cfg, model, sparsity),
                      stage_fields(sparsity))
    try:
        summary = train(model, corpus, cfg.trainer, cfg.optim, io, hooks, callbacks, StartState(resume, fill))
    except Interrupted as exc:
        raise Interrupted(f"{exc}; continue in this folder with: {resume_policy.continue_command(run_dir)}", exc.exit_code - 128) from None
    except DiskFull as exc:
        raise DiskFull(f"{exc}; once there is space, continue in this folder with: {resume_policy.continue_command(run_dir)}") from None
    except OutOfMemory as exc:
        t = cfg.trainer
        raise UsageError(f"trainer.micro_batch_size={t.micro_batch_size} at trainer.seq_len={t.seq_len} does not fit in "
                         f"memory ({exc}); lower trainer.micro_batch_size and raise trainer.grad_accum, or set "
                         "trainer.activation_checkpointing=true, or shorten trainer.seq_len") from None
    finally:
        if samples is not None:
            samples.close()
    if sparsity.sparsifier is not None:
        sparsity.sparsifier.remove()
    summary.update(final_dir=str(run_dir / "final"), run_dir=str(run_dir),
                   resumed_from=str(resume_from) if resume_from else None, ranks=world.size, data=asdict(corpus.counts),
                   tokens_per_s_per_rank=summary["tokens_per_s"] / world.size)
    if world.main:
        write_summary(run_dir / "summary.json", summary)
        print_summary(summary)
    display.message(f"run folder: {run_dir}")
    return summary


class Samples:
    """``trainer.sample_every``: the model continues the generate.prompt(s) after every N steps
    and after the last (:class:`EveryNSteps` calls :meth:`write`), into ``samples.jsonl``. The
    model generates in eval mode (so SAT's patched layers run dense) with forked random state:
    the training it interrupts goes on exactly as without it. One process only: FSDP2's
    generation would need every rank in each forward."""

    def __init__(self, cfg: TrainConfig, model: PreTrainedModel, tokenizer: Any, run_dir: Path,
                 resumed_at: int | None, ranks: int) -> None:
        from satrun.training.loggers import JsonLines

        if ranks > 1:
            raise UsageError(f"trainer.sample_every={cfg.trainer.sample_every} works in one process, not {ranks} ranks; "
                             "generate from a checkpoint with satrun generate instead")
        self.g, self.model, self.tokenizer = cfg.generate, model, tokenizer
        self.prompts = read_prompts(self.g.prompt, self.g.prompt_file)
        self.chat = uses_chat(self.g, tokenizer)
        self.precision = cfg.trainer.precision
        # samples after step N are written before step N's checkpoint: a resume from it keeps them
        self.open = lambda: JsonLines(run_dir / "samples.jsonl", keep_through=resumed_at)
        self.records: Any = None  # opened at the first samples: the run may still be refused until training starts

    def write(self, step: int) -> None:
        device = next(self.model.parameters()).device
        amp = runtime.precision_context(self.precision, device)
        self.records = self.records or self.open()
        for result in generate_texts(self.model, self.tokenizer, self.prompts, self.g, device, amp):
            self.records.log({"step": step, **result, "settings": describe(self.g, self.chat)})

    def close(self) -> None:
        if self.records is not None:
            self.records.close()


def periodic_benchmark(cfg: TrainConfig, model: PreTrainedModel, tokenizer: Any, ranks: int) -> EveryNSteps:
    """``trainer.benchmark_every``: at the start, every N steps and at the end, a ``benchmark``
    record of the eval.* benchmarks of the model as it stands (dense: the harness scores it in
    eval mode), as ``task/metric`` scores. Unknown tasks fail here, before training. One
    process only, as for samples: FSDP2's forwards would need every rank."""
    from satrun import evaluation

    if ranks > 1:
        raise UsageError(f"trainer.benchmark_every={cfg.trainer.benchmark_every} works in one process, not {ranks} ranks; "
                         "score the run's final/ model with satrun eval instead")
    manager = evaluation.task_manager(cfg.eval)

    def record(step: int) -> dict[str, Any]:
        device = next(model.parameters()).device
        amp = runtime.precision_context(cfg.trainer.precision, device)
        return {"kind": "benchmark", **evaluation.scores(evaluation.evaluate(model, tokenizer, cfg.eval, cfg.trainer.seed, amp,
                                                                           manager, progress=False, stderr=False))}

    return EveryNSteps(cfg.trainer.benchmark_every, record, at_start=True)
