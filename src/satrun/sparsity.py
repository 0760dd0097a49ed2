"""SAT's wiring into a run, from typed config: the Sparsifier and its schedule, the token rows
it is handed, the FLOPs each step counts, the start-up line, and its own fields of the summary.
(The method itself is :mod:`satrun.sat`, which knows no config of the run; the trainer knows
nothing of either.)"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from transformers import PreTrainedModel

from satrun.config import TrainConfig, sparse_tokens
from satrun.data import token_counts, token_rows
from satrun.errors import UsageError
from satrun.perf.flops import Shape, step_flops
from satrun.sat import ScheduleError, ScheduledSparsity, Sparsifier, UnsupportedModel, build_stages
from satrun.sat.schedule import fitting_rungs
from satrun.training import distributed, runtime


def build_sparsity(cfg: TrainConfig, model: PreTrainedModel) -> ScheduledSparsity:
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


def adapted_shape(cfg: TrainConfig, shape: Shape) -> Shape:
    """The shape with the run's LoRA rank (the FLOP and memory models then count a frozen base)."""
    return replace(shape, lora_rank=cfg.adapter.r) if cfg.adapter.name == "lora" else shape


class StepFlopCounter:
    """A step's training FLOPs from the FLOP model: each micro-batch's real token counts
    (labelled, unlabelled, padding) at the current stage's rates (``trainer.train``'s ``flops``)."""

    def __init__(self, cfg: TrainConfig, model: PreTrainedModel, sparsity: ScheduledSparsity) -> None:
        self.shape, self.sparsity = adapted_shape(cfg, Shape.from_config(model.config)), sparsity
        self.align = cfg.selector.align_on(runtime.resolve_device(cfg.trainer.device).type)
        self.layers, self.tokens, self.omit = cfg.scheduler.layers, sparse_tokens(cfg), cfg.scheduler.omit

    def __call__(self, batches: list[dict]) -> float:
        stage = self.sparsity.current
        return sum(step_flops(self.shape, b["input_ids"].shape[1], token_counts(b), stage.mlp_rates, stage.attn_rate,
                              self.align, self.layers, self.tokens, self.omit) for b in batches)


def first_stage_layer_rates(cfg: TrainConfig) -> list[float] | None:
    """The per-layer MLP rates of the run's first stage, where ``scheduler.layer_scale`` gives them."""
    rates = build_stages(cfg.scheduler, cfg.trainer.max_steps)[0].mlp_layer_rates
    return None if rates is None else list(rates)


def describe_sparsity(cfg: TrainConfig, sparsity: ScheduledSparsity) -> str:
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


def stage_fields(sparsity: ScheduledSparsity) -> Callable[[str, float], dict[str, Any]]:
    """SAT's fields of a stage in the run's summary (the trainer's ``StepHooks.stage``): the
    share of the stage's time spent scoring and selecting (``select_share``) and, where the
    stage spreads its MLP rate over the layers, each layer's rate (``mlp_layer_rates``;
    ``mlp_rate`` is then their mean)."""
    layer_rates = {s.name: s.mlp_layer_rates for s in sparsity.stages}

    def fields(name: str, total_s: float) -> dict[str, Any]:
        found: dict[str, Any] = {"select_share": sparsity.overhead_by_stage().get(name, 0.0) / total_s if total_s else 0.0}
        if layer_rates.get(name) is not None:
            found["mlp_layer_rates"] = list(layer_rates[name])
        return found

    return fields
