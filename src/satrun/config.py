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
from satrun.sat.settings import MetricConfig, SchedulerConfig, SelectorConfig


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
    from satrun.checks import validate  # the checks know every section; this module defines them

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


def sparse_tokens(cfg: TrainConfig) -> str:
    """Which tokens omit neurons: ``scheduler.tokens``, with auto meaning unlabelled in SFT (the
    prompts carry no loss) and all in CPT and in SFT with ``mode.train_on_inputs`` (where every
    token carries one)."""
    if cfg.scheduler.tokens != "auto":
        return cfg.scheduler.tokens
    return "unlabelled" if cfg.mode.name == "sft" and not cfg.mode.train_on_inputs else "all"
