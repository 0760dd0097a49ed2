"""Typed settings of a training run.

Each part of satrun owns a small dataclass; :class:`TrainConfig` composes them. The CLI builds one
from the Hydra-composed config with :func:`from_dict`; nothing below the CLI sees OmegaConf.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from satrun.errors import UsageError
from satrun.perf.settings import BenchConfig, PlanConfig, ProbeConfig
from satrun.sat import schedule
from satrun.sat.importance import METRICS
from satrun.sat.settings import (FILLS, NORMALIZE, OMIT, SELECTORS, SPARSE_TOKENS, MetricConfig, SchedulerConfig,
                                 SelectorConfig)


@dataclass
class ModelConfig:
    """Which model to train. ``source`` decides how ``path`` is read."""

    name: str = "smollm2-135m"  # the model config chosen (model=<name>), for logs and reports
    source: str = "packaged"  # packaged | pretrained (model.path) | random (the sizes below)
    path: Optional[str] = None  # pretrained: a local Hugging Face folder (or a hub id where a hub is reachable)
    tokenizer: Optional[str] = None  # random models: a tokenizer folder/hub id; None = packaged SmolLM2's
    # Sizes: build a source=random model; plan any model without its weights.
    hidden_size: int = 64  # model width
    intermediate_size: int = 128  # MLP channels per layer
    num_layers: int = 2  # decoder layers
    num_heads: int = 4  # attention (query) heads
    num_kv_heads: int = 2  # key/value heads (fewer than num_heads: grouped-query attention)
    max_position_embeddings: int = 1024  # longest sequence the model supports
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary
    tie_word_embeddings: bool = True  # the LM head shares the input embedding's weights
    attn_implementation: Optional[str] = None  # eager | sdpa | flash_attention_2 | flex_attention; null: transformers' default (sdpa)

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """Parameter-efficient fine-tuning: none (every weight trains) or lora (peft's LoRA: the
    base weights stay frozen and bit-identical, only the adapters train)."""

    name: str = "none"  # none | lora
    r: int = 16  # lora: rank of each adapter
    alpha: float = 32.0  # lora: scaling numerator (the update is alpha / r * B A)
    dropout: float = 0.0  # lora: dropout on each adapter's input
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))  # lora: the projections adapted (Llama-family names)


@dataclass
class DataConfig:
    """Where the training text comes from.

    ``format`` is one of: bible (World English Bible chapters), chatterbot (English prompt/response
    pairs), text (plain text files), jsonl, parquet (local files), hub (a dataset by name).
    """

    name: str = "bible"  # the data config chosen (data=<name>), for logs and reports
    format: str = "bible"  # bible | chatterbot | text | jsonl | parquet | hub
    path: Optional[str] = None  # file, folder or glob for text/jsonl/parquet; dataset name for hub
    hub_config: Optional[str] = None  # hub: the dataset configuration (subset), if it has several
    split: str = "train"  # hub: the split read
    text_field: str = "text"  # CPT: the field holding a document
    schema: str = "pairs"  # SFT records: pairs (prompt_field, response_field) | alpaca (instruction, input, output) | prompt_completion (TRL's prompt, completion: text or messages) | messages (messages_field)
    prompt_field: str = "prompt"  # SFT, schema=pairs: the field holding the user turn
    response_field: str = "response"  # SFT, schema=pairs: the field holding the answer trained on
    messages_field: str = "messages"  # SFT, schema=messages: the field of chats ([{role, content}] or ShareGPT [{from, value}])
    system_field: Optional[str] = None  # SFT: a field holding each record's system prompt (null or empty: none)
    system_prompt: Optional[str] = None  # SFT: the system turn of every chat that has none of its own
    sample_by: str = "paragraph"  # text files: a document per file (document), blank-line paragraph or line
    eval_fraction: float = 0.02  # share of documents/examples held out for evaluation
    packing: bool = False  # SFT: bin-pack whole chats into rows of trainer.seq_len (no attention across chats); mode=sft turns it on
    max_examples: Optional[int] = None  # cap on documents/examples read (quick experiments)
    skip_invalid: bool = False  # leave out records with a null, empty or non-text field (counted in one warning) instead of stopping


@dataclass
class ModeConfig:
    """Training regime: cpt (packed causal LM on raw text) or sft (loss on responses only)."""

    name: str = "cpt"  # cpt (packed text, loss on every token) | sft (chats, loss on answers only)
    train_on_inputs: bool = False  # SFT: the loss on every token of the chat, prompts and template included, not on the answers only


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a decay schedule."""

    lr: float = 3e-4  # peak learning rate, reached after warmup_steps
    weight_decay: float = 0.1  # decoupled weight decay of matrices (not norms, biases)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decays
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 10  # linear warm-up from lr/warmup_steps to lr
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr (cosine and linear)


@dataclass
class TrainerConfig:
    """Loop settings: how long, how big, how often."""

    max_steps: int = 40  # optimizer steps of the run
    seq_len: int = 256  # tokens per sequence (CPT block length; SFT truncation)
    micro_batch_size: int = 4  # sequences per forward/backward (per rank)
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 20  # 0: evaluate only at the start and the end
    eval_batches: int = 4  # batches of micro_batch_size per evaluation; 0 = the whole held-out set
    log_every: int = 5  # a train record every N steps
    save_every: int = 0  # checkpoint every N steps and at the last into checkpoints/step_N (0: only the final model)
    overwrite: bool = False  # replace a run already in the run folder (its metrics, checkpoints, final/) rather than refuse to start
    keep_checkpoints: int = 2  # the newest K checkpoints are kept (0: all)
    max_skips: int = 0  # optimizer steps with non-finite loss or gradients that may be skipped before stopping
    sample_every: int = 0  # every N steps and at the end, the model continues generate.prompt(s) into samples.jsonl (0: never)
    benchmark_every: int = 0  # every N steps and at the end, the dense model is scored on eval.tasks ("benchmark" records; 0: never)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16 | tf32 (fp32, TF32 matmuls; CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    peak_flops: Optional[float] = None  # per device, FLOP/s, for the model FLOP utilisation (mfu) in records, summary and bench; null: listed GPUs' bf16 peak
    seed: int = 1234  # seeds data order, split, initialisation and SAT sampling; in [0, 2**32)
    activation_checkpointing: bool = False  # recompute each layer in backward: less memory, about a third more compute
    compile: bool = False  # torch.compile each decoder layer (SAT's selection stays eager; a stage's new kept counts compile once)
    strategy: str = "auto"  # auto (DDP when several ranks run) | single | ddp | fsdp (FSDP2)
    progress: str = "auto"  # auto (bar on a terminal, log lines otherwise) | bar | log


@dataclass
class LoggerConfig:
    """Where train and eval records go besides metrics.jsonl, which is always written."""

    name: str = "jsonl"  # jsonl (only) | tensorboard (tb/ in the run folder) | wandb
    project: str = "satrun"  # wandb project
    mode: str = "offline"  # wandb: offline (no network; `wandb sync` later) | online


@dataclass
class LauncherConfig:
    """How ranks are started: none (one process, or ranks already started by torchrun) or
    torchrun (satrun starts ``nproc_per_node`` ranks itself through torch.distributed)."""

    name: str = "none"  # none (one process, or ranks started by torchrun) | torchrun (satrun starts the ranks)
    nproc_per_node: int = 1  # launcher=torchrun: ranks started on this machine


@dataclass
class GenerateConfig:
    """What `satrun generate` writes with: which weights, which prompts, how to sample."""

    run: Optional[str] = None  # a run folder (its final/, else its newest checkpoint), a final/ or checkpoint folder; None: the configured model
    prompt: list[str] = field(default_factory=lambda: ["Tell me about the sea."])  # prompts, e.g. generate.prompt='[Hi,"How are you?"]'
    prompt_file: Optional[str] = None  # a text file with one prompt per line, instead of generate.prompt
    max_new_tokens: int = 64  # tokens generated per prompt at most
    temperature: float = 0.0  # 0: greedy (deterministic); above 0: sampling at this temperature
    top_p: float = 1.0  # sampling: nucleus probability mass kept
    chat: str = "auto"  # auto (use the tokenizer's chat template when it has one) | on | off (plain text continuation)
    stream: bool = True  # print tokens as they are generated


@dataclass
class EvalConfig:
    """What `satrun eval` (and trainer.benchmark_every) scores with lm-evaluation-harness."""

    run: Optional[str] = None  # a run folder (its final/, else its newest checkpoint), a final/, checkpoint or adapter folder; None: the configured model
    tasks: list[str] = field(default_factory=lambda: ["bible_cloze", "chatterbot_mc"])  # harness task or group names, e.g. eval.tasks=[arc_easy,hellaswag]
    limit: Optional[float] = None  # examples per task at most (below 1: a share of them); None: all
    num_fewshot: Optional[int] = None  # examples shown before each question; None: each task's own setting (0 for satrun's tasks)
    batch_size: int = 8  # sequences per forward
    include_path: list[str] = field(default_factory=list)  # folders of the user's own task YAML files, searched before the harness's tasks
    chat_template: bool = False  # render each question through the tokenizer's chat template (for chat-tuned models)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    resume: Optional[str] = None  # auto: the newest checkpoint of the run folder; or a checkpoint / run folder
    resume_allow_changes: bool = False  # resume although max_steps, batch, sequence, optimizer or SAT settings differ from the checkpoint's


_CHOICES = {
    "model.source": ("packaged", "pretrained", "random"),
    "adapter.name": ("none", "lora"),
    "data.format": ("bible", "chatterbot", "text", "jsonl", "parquet", "hub"),
    "data.sample_by": ("document", "paragraph", "line"),
    "data.schema": ("pairs", "alpaca", "prompt_completion", "messages"),
    "mode.name": ("cpt", "sft"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "trainer.precision": ("auto", "fp32", "bf16", "tf32"),
    "model.attn_implementation": ("null", "eager", "sdpa", "flash_attention_2", "flex_attention"),
    "trainer.progress": ("auto", "bar", "log"),
    "logger.name": ("jsonl", "tensorboard", "wandb"),
    "logger.mode": ("offline", "online"),
    "trainer.strategy": ("auto", "single", "ddp", "fsdp"),
    "launcher.name": ("none", "torchrun"),
    "metric.name": METRICS,
    "selector.name": SELECTORS,
    "selector.normalize": NORMALIZE,
    "selector.fill": FILLS,
    "scheduler.tokens": ("auto", *SPARSE_TOKENS),
    "scheduler.omit": OMIT,
}


def from_dict(raw: Any) -> TrainConfig:
    """Build a validated :class:`TrainConfig` from a dict or DictConfig (unknown keys are errors,
    those added with Hydra's ``+key=value`` too)."""
    extra = _unknown_keys(OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw, TrainConfig)
    if extra:
        raise UsageError(unknown_key(extra[0]))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise UsageError(f"invalid config{f' at {key}' if key else ''}: {str(exc).splitlines()[0]}") from exc
    assert isinstance(cfg, TrainConfig)
    validate(cfg)
    return cfg


def _unknown_keys(raw: Any, cls: type, prefix: str = "") -> list[str]:
    """The dotted keys of ``raw`` (a nested dict) that the dataclass ``cls`` does not define."""
    if not isinstance(raw, dict):
        return []
    hints, found = typing.get_type_hints(cls), []
    for key, value in raw.items():
        if key not in hints:
            found.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]):
            found += _unknown_keys(value, hints[key], f"{prefix}{key}.")
    return found


def all_keys(cls: type = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Every dotted key of the config."""
    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    found: list[str] = []
    for f in dataclasses.fields(cls):
        found += all_keys(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name]) else [prefix + f.name]
    return found


def unknown_key(key: str) -> str:
    """The one line for a key satrun's config does not have, with the keys it may have meant."""
    section, _, name = key.rpartition(".")
    initials = "".join(word[0] for word in name.split("_") if word)  # learning_rate -> lr
    close = [k for k in all_keys() if k.rpartition(".")[0] == section and k.rpartition(".")[2] == initials]
    close += [k for k in difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.6) if k not in close]
    return (f"{key} is not a key of satrun's config (a +key=value override adds no new key either)"
            + (f"; close: {', '.join(close)}" if close else "") + "; satrun train --help lists every key")


def validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, naming the setting."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if (value if value is not None else "null") not in allowed:
            raise UsageError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    t, o, d = cfg.trainer, cfg.optim, cfg.data
    positive = {
        "trainer.max_steps": t.max_steps,
        "trainer.seq_len": t.seq_len,
        "trainer.micro_batch_size": t.micro_batch_size,
        "trainer.grad_accum": t.grad_accum,
        "trainer.log_every": t.log_every,
        "launcher.nproc_per_node": cfg.launcher.nproc_per_node,
    }
    for key, value in positive.items():
        if value < 1:
            raise UsageError(f"{key} must be at least 1, got {value}")
    for key, value in {
        "trainer.eval_every": t.eval_every,
        "trainer.eval_batches": t.eval_batches,
        "trainer.save_every": t.save_every,
        "trainer.keep_checkpoints": t.keep_checkpoints,
        "trainer.max_skips": t.max_skips,
        "trainer.sample_every": t.sample_every,
        "trainer.benchmark_every": t.benchmark_every,
        "optim.warmup_steps": o.warmup_steps,
        "optim.grad_clip": o.grad_clip,
        "optim.weight_decay": o.weight_decay,
    }.items():
        if value < 0:
            raise UsageError(f"{key} must be non-negative, got {value}")
    if t.peak_flops is not None and t.peak_flops <= 0:
        raise UsageError(f"trainer.peak_flops must be positive (FLOP/s), got {t.peak_flops}")
    a = cfg.adapter
    if a.name == "lora":
        _require_each({"adapter.r": (a.r, a.r >= 1, "at least 1"), "adapter.alpha": (a.alpha, a.alpha > 0, "positive"),
                       "adapter.dropout": (a.dropout, 0.0 <= a.dropout < 1.0, "in [0, 1)"),
                       "adapter.target_modules": (list(a.target_modules), bool(a.target_modules), "one module name at least")})
    if not 0 <= t.seed < 2**32:  # transformers.set_seed seeds NumPy, which takes no other seed
        raise UsageError(f"trainer.seed must be in [0, 2**32), got {t.seed}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise UsageError(f"optim.betas must be two values in [0, 1), got {list(o.betas)}")
    if o.lr <= 0:
        raise UsageError(f"optim.lr must be positive, got {o.lr}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise UsageError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not 0.0 < d.eval_fraction < 1.0:
        raise UsageError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
    if cfg.model.source == "pretrained" and not cfg.model.path:
        raise UsageError(
            f"model={cfg.model.name} needs its weights: set model.path=<local Hugging Face folder or hub id>"
        )
    if cfg.selector.temperature <= 0:
        raise UsageError(f"selector.temperature must be positive, got {cfg.selector.temperature}")
    if (cfg.selector.align is not None and cfg.selector.align < 1) or cfg.metric.token_stride < 1:
        raise UsageError("selector.align and metric.token_stride must be at least 1")
    g, e = cfg.generate, cfg.eval
    _require_each({
        "generate.max_new_tokens": (g.max_new_tokens, g.max_new_tokens >= 1, "at least 1"),
        "generate.temperature": (g.temperature, g.temperature >= 0, "non-negative (0: greedy)"),
        "generate.top_p": (g.top_p, 0 < g.top_p <= 1, "in (0, 1]"),
        "generate.chat": (g.chat, g.chat in ("auto", "on", "off"), "one of: auto, on, off"),
        "eval.tasks": (list(e.tasks), bool(e.tasks) and all(isinstance(n, str) and n.strip() for n in e.tasks),
                       "one task name at least, none blank"),
        "eval.batch_size": (e.batch_size, e.batch_size >= 1, "at least 1"),
        "eval.limit": (e.limit, e.limit is None or e.limit > 0, "positive (below 1: a share of each task), or null"),
        "eval.num_fewshot": (e.num_fewshot, e.num_fewshot is None or e.num_fewshot >= 0, "non-negative, or null"),
    })
    _refuse_unread(cfg)
    if cfg.plan.ranks < 1:
        raise UsageError(f"plan.ranks must be at least 1, got {cfg.plan.ranks}")
    if cfg.bench.steps < 1 or cfg.bench.repeats < 1 or not all(0.0 < r < 1.0 for r in cfg.bench.rates) \
            or not all(0.0 < r <= 1.0 for r in cfg.bench.backward_rates):
        raise UsageError("bench.steps and bench.repeats must be at least 1, bench.rates in (0, 1) and "
                         "bench.backward_rates in (0, 1]")
    if cfg.adapter.name != "none" and cfg.bench.backward_rates != BenchConfig().backward_rates:
        raise UsageError(f"bench.backward_rates times scheduler.omit=backward, which does not take adapters yet; leave it "
                         f"out with adapter={cfg.adapter.name}")
    p = cfg.probe
    top = 1.0 if cfg.scheduler.omit == "backward" else 0.999999  # a backward omission may keep no channel
    if p.batches < 1 or not p.rates or not all(0.0 < r <= top for r in [*p.rates, p.layer_rate]):
        raise UsageError("probe.batches must be at least 1, probe.rates and probe.layer_rate in (0, 1) "
                         "((0, 1] with scheduler.omit=backward)")
    unknown = [m for m in p.metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"probe.metrics: {unknown} not among {', '.join(METRICS)}")
    if p.target_speedup is not None and p.target_speedup <= 1.0:
        raise UsageError(f"probe.target_speedup must be above 1, got {p.target_speedup}")
    try:
        schedule.validate(cfg.scheduler)  # the stages themselves are built once, where they are used
    except schedule.ScheduleError as exc:
        raise UsageError(str(exc)) from exc
    if cfg.scheduler.tokens == "unlabelled" and (cfg.mode.name == "cpt" or cfg.mode.train_on_inputs):
        where = "mode=cpt" if cfg.mode.name == "cpt" else "mode.train_on_inputs=true"
        raise UsageError(f"scheduler.tokens=unlabelled omits neurons for tokens without a loss; with {where} every token "
                         "carries one (use scheduler.tokens=all)")
    attn = cfg.scheduler.heads_rate()
    if sparse_tokens(cfg) == "unlabelled" and attn and cfg.scheduler.name != "dense":
        raise UsageError(f"scheduler.attn_rate={cfg.scheduler.attn_rate}: heads are kept when only unlabelled tokens omit "
                         "neurons (scheduler.tokens=unlabelled, the SFT default); set scheduler.attn_rate=0 or "
                         "scheduler.tokens=all")
    if cfg.scheduler.omit == "backward" and cfg.scheduler.name != "dense":
        _check_backward_omission(cfg)
    if d.packing and cfg.mode.name != "sft":
        raise UsageError("data.packing=true packs chats (mode=sft); CPT text is always packed into blocks of trainer.seq_len")
    if d.format in ("text", "jsonl", "parquet", "hub") and not d.path:
        raise UsageError(f"data={d.name} needs data.path=<{'dataset name' if d.format == 'hub' else 'file, folder or glob'}>")


def _require_each(checks: dict[str, tuple[Any, bool, str]]) -> None:
    """``{key: (value, fine, what is expected)}``: the first key that is not fine, in one line."""
    for key, (value, fine, expected) in checks.items():
        if not fine:
            raise UsageError(f"{key}={'null' if value is None else value} must be {expected}")




def _check_backward_omission(cfg: TrainConfig) -> None:
    """``scheduler.omit=backward`` computes plain MLPs only. (It scores every sparse token's
    activations from the dense forward and adds nothing for omitted channels, so
    ``metric.token_stride`` and ``selector.fill`` are not read there; they are not refused,
    because the metric and selector options set them: ``metric=maxip`` or ``selector=topk``
    must still compose with a calibration in this form.)"""
    if cfg.adapter.name != "none":
        raise UsageError(f"scheduler.omit=backward computes MLPs without adapters; adapter={cfg.adapter.name} trains "
                         "with scheduler.omit=forward (or scheduler=dense)")


def sparse_tokens(cfg: TrainConfig) -> str:
    """Which tokens omit neurons: ``scheduler.tokens``, with auto meaning unlabelled in SFT (the
    prompts carry no loss) and all in CPT and in SFT with ``mode.train_on_inputs`` (where every
    token carries one)."""
    if cfg.scheduler.tokens != "auto":
        return cfg.scheduler.tokens
    return "unlabelled" if cfg.mode.name == "sft" and not cfg.mode.train_on_inputs else "all"


_SETTINGS = tuple(f.name for f in dataclasses.fields(DataConfig) if f.name in
                  ("schema", "prompt_field", "response_field", "messages_field", "system_field"))
_SCHEMAS = {  # data.schema: (the keys it does not read, what it reads)
    "pairs": (("messages_field",), "it reads data.prompt_field and data.response_field; data.schema=messages reads chats"),
    "alpaca": (("prompt_field", "response_field", "messages_field"), "it reads the fields instruction, input and output"),
    "prompt_completion": (("prompt_field", "response_field", "messages_field"), "it reads the fields prompt and completion"),
    "messages": (("prompt_field", "response_field"), "it reads data.messages_field"),
}


@dataclass(frozen=True)
class _Unread:
    """Under ``key`` set to one of ``values``, the ``keys`` are not read: one set away from its
    default would do nothing, so it is refused in one line (with ``hint``)."""

    key: str
    values: tuple[str, ...]
    keys: tuple[str, ...]
    hint: str = ""


def _fields(section: str, cls: type) -> tuple[str, ...]:
    return tuple(f"{section}.{f.name}" for f in dataclasses.fields(cls))


# Every setting an option does not read, in one table (checked in order).
UNREAD = (
    _Unread("scheduler.name", ("dense",), tuple(f"scheduler.{k}" for k in ("rate", "attn_rate", "sparse_fraction", "ladder_steps",
            "dense_fraction", "layers", "layer_scale", "tokens", "omit")) + _fields("metric", MetricConfig)
            + _fields("selector", SelectorConfig), "SAT is off"),
    _Unread("scheduler.name", ("constant",), ("scheduler.sparse_fraction", "scheduler.ladder_steps", "scheduler.dense_fraction")),
    _Unread("selector.name", ("topk",), ("selector.temperature", "selector.normalize")),
    _Unread("metric.name", ("random", "magnitude", "wanda"), ("metric.token_stride",)),
    _Unread("launcher.name", ("none",), ("launcher.nproc_per_node",)),
    _Unread("adapter.name", ("none",), ("adapter.r", "adapter.alpha", "adapter.dropout", "adapter.target_modules")),
    _Unread("logger.name", ("jsonl", "tensorboard"), ("logger.project", "logger.mode"), "they are Weights & Biases'"),
    _Unread("mode.name", ("cpt",), ("mode.train_on_inputs", *(f"data.{k}" for k in (*_SETTINGS, "system_prompt"))),
            "they describe SFT records; in CPT every token carries a loss"),
    _Unread("data.format", ("chatterbot",), tuple(f"data.{k}" for k in _SETTINGS), "its records are chats already"),
    *(_Unread("data.schema", (schema,), tuple(f"data.{k}" for k in keys), reads) for schema, (keys, reads) in _SCHEMAS.items()),
    _Unread("data.format", ("bible", "chatterbot", "text", "jsonl", "parquet"), ("data.hub_config", "data.split"),
            "they choose what data=hub reads"),
    _Unread("data.format", ("bible", "chatterbot", "jsonl", "parquet", "hub"), ("data.sample_by",),
            "it splits plain text files (data=text)"),
)


def _value(cfg: Any, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def unread_keys(section: str, option: str) -> tuple[str, ...]:
    """The keys of ``section`` that its option ``option`` (``section.name``) does not read."""
    return tuple(key.split(".")[1] for rule in UNREAD if rule.key == f"{section}.name" and option in rule.values
                 for key in rule.keys if key.startswith(f"{section}."))


def _refuse_unread(cfg: TrainConfig) -> None:
    defaults = TrainConfig()
    for rule in UNREAD:
        option = _value(cfg, rule.key)
        if option not in rule.values:
            continue
        for key in rule.keys:
            value = _value(cfg, key)
            if value != _value(defaults, key):
                name = key.split(".")[0] if key.endswith(".name") else key
                where = f"{rule.key.split('.')[0]}={option}" if rule.key.endswith(".name") else f"{rule.key}={option}"
                raise UsageError(f"{name}={_shown(value)} does nothing with {where}"
                                 + (f" ({rule.hint})" if rule.hint else "") + "; leave it out")