"""What each command does, end to end, on typed config: train, plan, bench."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from satrun.config import TrainConfig, sparse_tokens
from satrun.data import BatchStream, Corpus, build_corpus, eval_batches, pack_chats, token_counts, token_rows
from satrun.errors import DiskFull, Interrupted, RunStopped, UsageError
from satrun.generation import describe, generate_texts, uses_chat
from satrun.models import load_model, load_tokenizer, load_weights, max_sequence_length, weights_folder
from satrun.models.adapters import (ADAPTER_FOLDER, BASE_FOLDER, add_adapters, initial_adapter_state, is_adapted,
                                    is_adapter_folder, load_adapted, load_adapters, save_adapters, save_base, save_merged,
                                    weights_source)
from satrun.perf.bench import print_bench, run_bench
from satrun.perf import probe
from satrun.perf.flops import Shape, step_flops
from satrun.perf.plan import build_plan, print_plan, shape_of, write_plan
from satrun.plots import probe_plot, speedup_plot
from satrun.sat import ScheduleError, ScheduledSparsity, Sparsifier, UnsupportedModel, build_stages
from satrun.sat.schedule import fitting_rungs
from satrun.training import checkpoint, distributed, launcher, runtime
from satrun.training import resume as resume_policy
from satrun.training.display import QuietDisplay, make_display, print_summary
from satrun.training.metrics import write_summary
from satrun.training.optim import build_optimizer
from satrun.training.loggers import Fanout, build_loggers
from satrun.training.saving import remove_stale, write_hf_folder
from satrun.training.trainer import train


def run_training(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train as configured, writing metrics.jsonl, summary.json and final/ into ``run_dir``.

    Under torch.distributed every rank runs this; the first one alone writes the run folder.
    With ``launcher=torchrun`` it starts the ranks itself and returns the first rank's summary.
    """
    if cfg.launcher.name == "torchrun" and "LOCAL_RANK" not in os.environ:
        return launcher.launch_ranks(cfg, run_dir, run_training)
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
    fill = _weight_source(cfg, model, resume, sharded)
    if resume is not None:
        display.message(f"resuming from {resume_from} (step {resume['run']['step']})")

    sparsity = _sparsity(cfg, model)
    display.message(_describe(cfg, sparsity))
    if cfg.optim.warmup_steps > cfg.trainer.max_steps:
        display.message(f"warning: optim.warmup_steps={cfg.optim.warmup_steps} is longer than the run "
                        f"(trainer.max_steps={cfg.trainer.max_steps}): the learning rate never reaches optim.lr")
    keep_through = resume["run"]["step"] if resume else None
    benchmark = _benchmark(cfg, model, tokenizer, world.size) if cfg.trainer.benchmark_every else None
    samples = Samples(cfg, model, tokenizer, run_dir, keep_through, world.size) if cfg.trainer.sample_every else None
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

    try:
        summary = train(model, corpus, cfg.trainer, cfg.optim, run_dir, display, save_model=write_model, save_final=write_final,
                        hooks=[samples, sparsity] if samples else [sparsity], resume=resume, logger=logger, fill=fill,
                        settings=settings, launched=started, batch_hooks=token_rows_hooks(sparsity.sparsifier),
                        flops=StepFlopCounter(cfg, model, sparsity), benchmark=benchmark)
    except Interrupted as exc:
        raise Interrupted(f"{exc}; continue in this folder with: {resume_policy.continue_command(run_dir)}", exc.exit_code - 128) from None
    except DiskFull as exc:
        raise DiskFull(f"{exc}; once there is space, continue in this folder with: {resume_policy.continue_command(run_dir)}") from None
    trained = time.perf_counter()
    overhead = sparsity.overhead_by_stage()
    layer_rates = {s.name: s.mlp_layer_rates for s in sparsity.stages}
    for stage in summary["stages"]:
        stage["select_share"] = overhead.get(stage["name"], 0.0) / stage["total_s"] if stage["total_s"] else 0.0
        if layer_rates.get(stage["name"]) is not None:  # mlp_rate is then their mean
            stage["mlp_layer_rates"] = list(layer_rates[stage["name"]])
    if sparsity.sparsifier is not None:
        sparsity.sparsifier.remove()
    if samples is not None:
        samples.write(summary["steps"])
        samples.close()
    summary.update(final_dir=str(run_dir / "final"), run_dir=str(run_dir),
                   wall_s=summary["wall_s"] + time.perf_counter() - trained,  # the trainer's, plus the last samples
                   resumed_from=str(resume_from) if resume_from else None, ranks=world.size, data=asdict(corpus.counts),
                   tokens_per_s_per_rank=summary["tokens_per_s"] / world.size)
    if world.main:
        write_summary(run_dir / "summary.json", summary)
        print_summary(summary)
    display.message(f"run folder: {run_dir}")
    return summary


class Samples:
    """``trainer.sample_every``: a step hook that has the model continue the generate.prompt(s)
    after every N steps (and, called by the run, after the last), into ``samples.jsonl``. The
    model generates in eval mode (so SAT's patched layers run dense) with forked random state:
    the training it interrupts goes on exactly as without it. One process only: FSDP2's
    generation would need every rank in each forward."""

    def __init__(self, cfg: TrainConfig, model: PreTrainedModel, tokenizer: Any, run_dir: Path,
                 resumed_at: int | None, ranks: int) -> None:
        from satrun.training.loggers import JsonLines

        if ranks > 1:
            raise UsageError(f"trainer.sample_every={cfg.trainer.sample_every} works in one process, not {ranks} ranks; "
                             "generate from a checkpoint with satrun generate instead")
        self.every, self.g, self.model, self.tokenizer = cfg.trainer.sample_every, cfg.generate, model, tokenizer
        self.prompts = _prompts(self.g.prompt, self.g.prompt_file)
        self.chat = uses_chat(self.g, tokenizer)
        self.precision = cfg.trainer.precision
        # samples after step N are written once step N's checkpoint is saved: a resume from it rewrites them
        self.open = lambda: JsonLines(run_dir / "samples.jsonl", keep_through=None if resumed_at is None else resumed_at - 1)
        self.records: Any = None  # opened at the first samples: the run may still be refused until training starts

    def __call__(self, step: int) -> dict[str, Any]:
        if step and step % self.every == 0:
            self.write(step)
        return {}

    def write(self, step: int) -> None:
        device = next(self.model.parameters()).device
        amp = runtime.autocast(device, runtime.resolve_precision(self.precision, device))
        self.records = self.records or self.open()
        for result in generate_texts(self.model, self.tokenizer, self.prompts, self.g, device, amp):
            self.records.log({"step": step, **result, "settings": describe(self.g, self.chat)})

    def close(self) -> None:
        if self.records is not None:
            self.records.close()


def _benchmark(cfg: TrainConfig, model: PreTrainedModel, tokenizer: Any, ranks: int) -> Callable[[], dict[str, float]]:
    """``trainer.benchmark_every``: the eval.* benchmarks of the model as it stands (dense: the
    harness scores it in eval mode), as ``task/metric`` scores. Unknown tasks fail here, before
    training. One process only, as for samples: FSDP2's forwards would need every rank."""
    from satrun import evaluation

    if ranks > 1:
        raise UsageError(f"trainer.benchmark_every={cfg.trainer.benchmark_every} works in one process, not {ranks} ranks; "
                         "score the run's final/ model with satrun eval instead")
    manager = evaluation.task_manager(cfg.eval)

    def scores() -> dict[str, float]:
        device = next(model.parameters()).device
        amp = runtime.autocast(device, runtime.resolve_precision(cfg.trainer.precision, device))
        return evaluation.scores(evaluation.evaluate(model, tokenizer, cfg.eval, cfg.trainer.seed, amp, manager, progress=False,
                                                     stderr=False))

    return scores












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


def run_plan(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """FLOPs, ideal SAT speed-up and memory of the configured run, from the model's shape alone
    (in SFT also from the data: its share of labelled, unlabelled and padding tokens)."""
    t = cfg.trainer
    precision = "fp32" if t.precision in ("fp32", "tf32") else "bf16"  # auto: planned for CUDA, where it means bf16
    align = cfg.selector.align_on("cpu" if t.device == "cpu" else "cuda")  # likewise
    split = _token_split(cfg) if cfg.mode.name == "sft" else None
    try:
        plan = build_plan(_adapted_shape(cfg, shape_of(cfg.model)), build_stages(cfg.scheduler, t.max_steps), t.seq_len, t.micro_batch_size,
                          precision, align, cfg.scheduler.layers, cfg.plan.ranks, t.strategy,
                          split, sparse_tokens(cfg), t.grad_accum, t.activation_checkpointing, cfg.scheduler.omit)
    except ScheduleError as exc:
        raise UsageError(str(exc)) from exc
    out = run_dir / "plan.json"
    write_plan(plan, out)
    print_plan(plan)
    print(f"plan written to {out}")
    return plan


def _token_split(cfg: TrainConfig) -> tuple[float, float, float]:
    """Shares of labelled, unlabelled and padding positions in the training data's micro-batches
    (in order; shuffled batches pad about as much)."""
    tokenizer = load_tokenizer(cfg.model)
    t = cfg.trainer
    corpus = build_corpus(cfg.data, cfg.mode.name, tokenizer, t.seq_len, t.micro_batch_size, t.seed, cfg.mode.train_on_inputs)
    counts = [0, 0, 0]
    for batch in eval_batches(corpus.train, t.micro_batch_size, corpus.pad_id, limit=0):
        counts = [a + b for a, b in zip(counts, token_counts(batch))]
    total = sum(counts)
    return counts[0] / total, counts[1] / total, counts[2] / total


def run_benchmark(cfg: TrainConfig, run_dir: Path) -> list[dict[str, Any]]:
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
                     _adapted_shape(cfg, Shape.from_config(model.config)), device, amp, cfg.optim.grad_clip,
                     t.peak_flops or runtime.peak_flops(device, dtype),
                     _first_stage_layer_rates(cfg), _attn_rate(cfg),
                     padded_batches=batches_of(corpus.train) if packed_sft else None, layer_omit=cfg.scheduler.omit)
    out = run_dir / "bench.json"
    out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    speedup_plot(rows, run_dir / "bench.png", f"satrun bench: {cfg.model.name}, {cfg.mode.name}, {device.type}, "
                                              f"seq {t.seq_len} x {t.micro_batch_size}")
    print_bench(rows)
    print(f"bench written to {out} and {out.with_suffix('.png').name}")
    return rows


def run_probe(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Sub-network losses, layer sensitivities and (with a target) calibrated per-layer rates;
    writes probe.json, probe.png and conf/scheduler/calibrated.yaml."""
    t, p = cfg.trainer, cfg.probe
    _refuse_adapters(cfg, "probe")
    backward = cfg.scheduler.omit == "backward"  # the forward is exact: gradients are screened, not losses
    if backward and p.target_speedup is not None:
        raise UsageError("probe.target_speedup calibrates the forward form; with scheduler.omit=backward the probe "
                         "measures gradients only (leave probe.target_speedup out)")
    if p.target_speedup is not None and cfg.scheduler.name == "dense":
        raise UsageError("probe.target_speedup calibrates a sparse schedule: choose scheduler=ladder or constant")
    _, model, corpus = load_inputs(cfg)
    device = runtime.resolve_device(t.device)
    model.to(device)
    stream = BatchStream(corpus.train, t.micro_batch_size, corpus.pad_id, t.seed)
    batches = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(p.batches)]
    shape, attn, tokens = Shape.from_config(model.config), _attn_rate(cfg), sparse_tokens(cfg)
    speedup = _probe_speedup(cfg, shape, batches)
    if backward:
        return _gradient_probe(cfg, model, batches, speedup, run_dir)
    metrics = list(dict.fromkeys([*p.metrics, cfg.metric.name]))  # the configured metric is always measured
    with runtime.autocast(device, runtime.resolve_precision(t.precision, device)):
        result = probe.measure(model, batches, metrics, p.rates, cfg.metric, cfg.selector, p.layer_rate, attn, t.seed,
                               tokens)
        result.update(metric=cfg.metric.name, selector=cfg.selector.name, attn_rate=attn, batches=p.batches,
                      tokens_per_batch=t.micro_batch_size * t.seq_len, mode=cfg.mode.name, sparse_tokens=tokens,
                      ideal_speedups=[speedup(r) for r in p.rates])
        if p.target_speedup is not None:
            increases = [x - result["dense_loss"] for x in result["loss"][cfg.metric.name]]
            try:
                rates = probe.calibrate(result["sensitivity"], p.rates, increases, p.layer_rate, speedup, p.target_speedup)
            except ValueError as exc:
                raise UsageError(f"probe.target_speedup={p.target_speedup}: {exc}") from exc
            uniform = probe.uniform_rate_for(speedup, p.target_speedup)
            result["calibration"] = {
                "target_speedup": p.target_speedup, "layer_rates": rates, "mean_rate": sum(rates) / len(rates),
                "ideal_speedup": speedup(rates), "uniform_rate": uniform,
                **probe.verify(model, batches, cfg.metric, cfg.selector, rates, uniform, attn, t.seed, tokens),
            }
    (run_dir / "probe.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    probe_plot(result, run_dir / "probe.png", f"satrun probe: {cfg.model.name}, {p.batches} x {t.micro_batch_size} x {t.seq_len} tokens")
    probe.print_probe(result)
    if "calibration" in result:
        out = _write_calibration(cfg, result["calibration"]["layer_rates"], run_dir / "conf" / "calibration" / "calibrated.yaml")
        print(f"calibration written to {out}; train with:\n"
              f"  satrun train calibration=calibrated {_sat_overrides(cfg)} --config-dir {run_dir / 'conf'}")
    print(f"probe written to {run_dir / 'probe.json'} and probe.png")
    return result


def _gradient_probe(cfg: TrainConfig, model: PreTrainedModel, batches: list[dict], speedup: Callable,
                    run_dir: Path) -> dict[str, Any]:
    """``satrun probe scheduler.omit=backward``: the sparse-backward gradient against the dense one."""
    t, p = cfg.trainer, cfg.probe
    device = runtime.resolve_device(t.device)
    with runtime.autocast(device, runtime.resolve_precision(t.precision, device)):
        result = probe.gradient_agreement(model, batches, p.rates, cfg.metric, cfg.selector, p.layer_rate, t.seed,
                                          sparse_tokens(cfg))
    result.update(metric=cfg.metric.name, selector=cfg.selector.name, batches=p.batches, mode=cfg.mode.name,
                  tokens_per_batch=t.micro_batch_size * t.seq_len, sparse_tokens=sparse_tokens(cfg),
                  ideal_speedups=[speedup(r) for r in p.rates])
    (run_dir / "probe.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    probe.print_gradient_probe(result)
    print(f"probe written to {run_dir / 'probe.json'}")
    return result


def run_generate(cfg: TrainConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Text from a trained (or any configured) model for each prompt, streamed to the terminal
    and written to generations.jsonl."""
    g = cfg.generate
    prompts = _prompts(g.prompt, g.prompt_file)
    set_seed(cfg.trainer.seed)
    device = runtime.resolve_device(cfg.trainer.device)
    folder, tokenizer, model = _inference_model(cfg, g.run, "generate.run")
    model.to(device)
    chat = uses_chat(g, tokenizer)
    amp = runtime.autocast(device, runtime.resolve_precision(cfg.trainer.precision, device))
    results = generate_texts(model, tokenizer, prompts, g, device, amp, echo=True)
    out_file = run_dir / "generations.jsonl"
    out_file.write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
    print(f"\ngenerations written to {out_file} (model: {folder or cfg.model.name}, {describe(g, chat)})")
    return results


def run_eval(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Benchmarks of a trained (or any configured) model through lm-evaluation-harness: the
    harness's results in eval.json, its table on the terminal and in eval.md."""
    from lm_eval.utils import handle_non_serializable

    from satrun import evaluation

    e = cfg.eval
    if distributed.current().size > 1:
        raise UsageError("satrun eval runs in one process (every rank would score the whole task); run it without torchrun")
    manager = evaluation.task_manager(e)  # an unknown task fails before any weights load
    set_seed(cfg.trainer.seed)
    device = runtime.resolve_device(cfg.trainer.device)
    folder, tokenizer, model = _inference_model(cfg, e.run, "eval.run")
    model.to(device)
    amp = runtime.autocast(device, runtime.resolve_precision(cfg.trainer.precision, device))
    results = evaluation.evaluate(model, tokenizer, e, cfg.trainer.seed, amp, manager)
    results["satrun"] = {"model": str(folder or cfg.model.name), "scores": evaluation.scores(results)}
    text = evaluation.table(results)
    staging = run_dir / "eval.json.tmp"  # complete or absent
    staging.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    staging.replace(run_dir / "eval.json")
    (run_dir / "eval.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"results written to {run_dir / 'eval.json'} (model: {folder or cfg.model.name})")
    return results


def _inference_model(cfg: TrainConfig, run: str | None, key: str) -> tuple[Path | None, Any, Any]:
    """(folder, tokenizer, model in float32 on the CPU) for generate and eval: the weights
    ``run`` names (see :func:`_weights_from`), else the configured model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _weights_from(run, key)
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


def _prompts(prompt: list[str], prompt_file: str | None) -> list[str]:
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


def _weights_from(run: str | None, key: str) -> Path | None:
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


def _probe_speedup(cfg: TrainConfig, shape: Shape, batches: list[dict]) -> Callable[[Any], float]:
    """The ideal speed-up of a sparse step at the given MLP rate(s): from the shape alone in CPT,
    from the probe batches' labelled / unlabelled / padding tokens in SFT (where only the
    unlabelled ones may be sparse and the LM head runs at the labelled ones)."""
    t, attn = cfg.trainer, _attn_rate(cfg)
    align = cfg.selector.align_on(runtime.resolve_device(t.device).type)
    # CPT: every position a labelled token
    counts = (1, 0, 0) if cfg.mode.name == "cpt" else [sum(c) for c in zip(*(token_counts(b) for b in batches))]
    tokens, omit = sparse_tokens(cfg), cfg.scheduler.omit

    def speedup(rates: Any) -> float:
        dense = step_flops(shape, t.seq_len, counts)
        return dense / step_flops(shape, t.seq_len, counts, rates, attn, align, cfg.scheduler.layers, tokens, omit)

    return speedup


def _sat_overrides(cfg: TrainConfig) -> str:
    """The metric and selector settings a calibration was measured with, as overrides."""
    m, s = cfg.metric, cfg.selector
    return (f"metric={m.name} metric.token_stride={m.token_stride} selector={s.name} "
            f"selector.temperature={s.temperature} selector.normalize={s.normalize} selector.fill={s.fill} selector.align={'null' if s.align is None else s.align}")


def _write_calibration(cfg: TrainConfig, layer_rates: list[float], path: Path) -> Path:
    """A calibration config file: the mean MLP rate and each layer's share of it, for the
    scheduler (``calibration=<file name>``; the packaged ones are conf/calibration/<model>_<mode>_<scheduler>_<adapter>.yaml)."""
    mean = sum(layer_rates) / len(layer_rates)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# @package scheduler",
             f"# Calibrated by satrun probe for model={cfg.model.name}: target ideal speed-up "
             f"{cfg.probe.target_speedup} of a sparse step at rate {mean:.4f}; measured with",
             f"#   {_sat_overrides(cfg)}",
             f"rate: {mean:.6g}",
             f"layer_scale: {json.dumps([round(r / mean, 6) if mean else 0.0 for r in layer_rates])}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _weight_source(cfg: TrainConfig, model: PreTrainedModel, resume: dict[str, Any] | None,
                   sharded: bool) -> Callable[[torch.nn.Module], None] | None:
    """How the parameters get their values once the trainer has wrapped the model (None: they
    have them). A resumed run reads its checkpoint (sharded checkpoints: the trainer restores
    them with the optimizer); an FSDP2 start has each rank read its own shards of the
    pre-trained weights, or, for a random model, take them from the first rank, which built it."""
    if is_adapted(model):
        return _adapted_weight_source(cfg, model, resume, sharded)
    if resume is not None:
        return None if resume["sharded"] else (lambda m: load_weights(m, Path(resume["folder"])))
    return _start_weights(cfg, model) if sharded else None


def _start_weights(cfg: TrainConfig, model: torch.nn.Module) -> Callable[[torch.nn.Module], None]:
    """An FSDP2 start: each rank reads its shards of the pre-trained weights, or, for a random
    model, takes them from the first rank, which built it."""
    folder = weights_folder(cfg.model)
    if folder is not None:
        return lambda m: load_weights(m, folder)
    full = model.state_dict() if distributed.current().main else None  # the first rank's whole model
    return lambda m: distributed.broadcast_weights(m, full)


def _adapted_weight_source(cfg: TrainConfig, model: torch.nn.Module, resume: dict[str, Any] | None,
                           sharded: bool) -> Callable[[torch.nn.Module], None] | None:
    """With adapters the base always comes from where the model does (a checkpoint holds the
    adapters alone). One process: the base is loaded and the adapters initialised already; a
    resume reads the checkpoint's adapters. FSDP2: the base as at any start, then the seeded
    initial adapters, or on resume the trainer restores them from the shards with the
    optimizer state."""
    if not sharded:
        return None if resume is None else (lambda m: load_adapters(m, Path(resume["folder"]) / ADAPTER_FOLDER))
    if resume is not None and not resume["sharded"]:
        raise UsageError(f"resume={resume['folder']}: a checkpoint of adapters written by one process does not resume "
                         "under trainer.strategy=fsdp; resume it as it was written")
    base = _start_weights(cfg, model)
    initial = initial_adapter_state(model, cfg.trainer.seed) if resume is None else {}

    def fill(m: torch.nn.Module) -> None:
        base(m)
        distributed.fill_whole(m, initial)
    return fill


def _sparsity(cfg: TrainConfig, model: PreTrainedModel) -> ScheduledSparsity:
    """The schedule's hook; the model is only modified if some stage omits neurons."""
    stages = build_stages(cfg.scheduler, cfg.trainer.max_steps)
    if all(stage.dense for stage in stages):
        return ScheduledSparsity(stages, None)
    try:
        sharded = distributed.sharded_start(cfg.trainer.strategy, distributed.current())  # FSDP2
        sparsifier = Sparsifier(model, cfg.metric, cfg.selector, cfg.scheduler.layers, seed=cfg.trainer.seed,
                                tokens=sparse_tokens(cfg), regather=sharded, omit=cfg.scheduler.omit)
        return ScheduledSparsity(stages, sparsifier)
    except ScheduleError as exc:
        raise UsageError(f"model={cfg.model.name}: {exc}") from exc
    except (UnsupportedModel, ValueError) as exc:
        raise UsageError(f"scheduler={cfg.scheduler.name}: {exc} (use scheduler=dense)") from exc


def token_rows_hooks(sparsifier: Sparsifier | None) -> list[Callable[[dict], None]]:
    """The batch hook that hands a token-aware sparsifier each micro-batch's rows: those whose
    next token carries a label run dense, the rest sparsely (none for ``tokens=all``)."""
    if sparsifier is None or sparsifier.tokens == "all":
        return []
    return [lambda batch: sparsifier.set_token_rows(*token_rows(batch))]


def _refuse_adapters(cfg: TrainConfig, command: str) -> None:
    if cfg.adapter.name != "none":
        raise UsageError(f"satrun {command} does not know adapters yet (adapter={cfg.adapter.name}): it would measure "
                         "full fine-tuning; leave adapter out (satrun plan and satrun bench count LoRA)")


def _adapted_shape(cfg: TrainConfig, shape: Shape) -> Shape:
    """The shape with the run's LoRA rank (the FLOP and memory models then count a frozen base)."""
    return replace(shape, lora_rank=cfg.adapter.r) if cfg.adapter.name == "lora" else shape


class StepFlopCounter:
    """A step's training FLOPs from the FLOP model: each micro-batch's real token counts
    (labelled, unlabelled, padding) at the current stage's rates (``trainer.train``'s ``flops``)."""

    def __init__(self, cfg: TrainConfig, model: PreTrainedModel, sparsity: ScheduledSparsity) -> None:
        self.shape, self.sparsity = _adapted_shape(cfg, Shape.from_config(model.config)), sparsity
        self.align = cfg.selector.align_on(runtime.resolve_device(cfg.trainer.device).type)
        self.layers, self.tokens, self.omit = cfg.scheduler.layers, sparse_tokens(cfg), cfg.scheduler.omit

    def __call__(self, batches: list[dict]) -> float:
        stage = self.sparsity.current
        return sum(step_flops(self.shape, b["input_ids"].shape[1], token_counts(b), stage.mlp_rates, stage.attn_rate,
                              self.align, self.layers, self.tokens, self.omit) for b in batches)


def _first_stage_layer_rates(cfg: TrainConfig) -> list[float] | None:
    """The per-layer MLP rates of the run's first stage, where ``scheduler.layer_scale`` gives them."""
    rates = build_stages(cfg.scheduler, cfg.trainer.max_steps)[0].mlp_layer_rates
    return None if rates is None else list(rates)


def _attn_rate(cfg: TrainConfig) -> float:
    return cfg.scheduler.rate if cfg.scheduler.attn_rate is None else cfg.scheduler.attn_rate


def _describe(cfg: TrainConfig, sparsity: ScheduledSparsity) -> str:
    if sparsity.sparsifier is None:
        return "SAT off: dense training (scheduler=dense)"
    plan = ", ".join(f"{s.name} {s.steps} step{'s' if s.steps != 1 else ''} @ {s.mlp_rate:.2f}/{s.attn_rate:.2f}" for s in sparsity.stages)
    where = "backward only (dense forward)" if cfg.scheduler.omit == "backward" else "forward and backward"
    text = f"SAT ({where}): metric={cfg.metric.name} selector={cfg.selector.name}; stages (mlp/attn rate): {plan}"
    rungs = fitting_rungs(cfg.scheduler, cfg.trainer.max_steps)
    if cfg.scheduler.name == "ladder" and rungs < cfg.scheduler.ladder_steps:
        text += (f" (scheduler.ladder_steps={cfg.scheduler.ladder_steps}: {rungs} rung(s) fit in "
                 f"trainer.max_steps={cfg.trainer.max_steps})")
    return text
