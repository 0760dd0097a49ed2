"""The checks of a composed :class:`~satrun.config.TrainConfig`: each key's choices and range,
the combinations a run cannot use, and every setting an option does not read (:data:`UNREAD`),
each refused in one line that names the key. :func:`satrun.config.from_dict` runs them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from satrun.config import DataConfig, TrainConfig, sparse_tokens
from satrun.errors import UsageError
from satrun.perf.settings import BenchConfig
from satrun.sat import schedule
from satrun.sat.importance import METRICS
from satrun.sat.settings import FILLS, NORMALIZE, OMIT, SELECTORS, SPARSE_TOKENS, MetricConfig, SelectorConfig

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