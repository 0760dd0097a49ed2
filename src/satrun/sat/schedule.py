"""Omission-rate schedules: dense, constant, and the ladder (LORS) that ends fully dense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from satrun.sat.settings import OMIT, SchedulerConfig


class ScheduleError(ValueError):
    """A schedule that cannot be laid out over the run."""


@dataclass(frozen=True)
class Stage:
    """Steps [start, end) trained at the given omission rates.

    ``mlp_rate`` is the MLP rate of every sparsified layer, or, when ``mlp_layer_rates`` gives
    each decoder layer its own rate, their mean (what records and summaries report).
    """

    name: str
    start: int
    end: int
    mlp_rate: float
    attn_rate: float
    mlp_layer_rates: Optional[tuple[float, ...]] = None

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def dense(self) -> bool:
        return self.mlp_rate == 0.0 and self.attn_rate == 0.0

    def per_layer(self, n_layers: int, layers: Optional[Sequence[int]] = None) -> tuple[list[float], list[float]]:
        """Each decoder layer's (MLP, attention) omission rates in this stage; layers outside
        ``layers`` (None: all) stay dense."""
        chosen = set(range(n_layers)) if layers is None else set(layers)
        if self.mlp_layer_rates is not None:
            if len(self.mlp_layer_rates) != n_layers:
                raise ScheduleError(
                    f"scheduler.layer_scale has {len(self.mlp_layer_rates)} values; the model has {n_layers} layers"
                )
            mlp = list(self.mlp_layer_rates)
        else:
            mlp = [self.mlp_rate if i in chosen else 0.0 for i in range(n_layers)]
        return mlp, [self.attn_rate if i in chosen else 0.0 for i in range(n_layers)]

    @property
    def mlp_rates(self) -> "float | tuple[float, ...]":
        """What a Sparsifier is given: one rate, or one per decoder layer."""
        return self.mlp_rate if self.mlp_layer_rates is None else self.mlp_layer_rates


def validate(cfg: SchedulerConfig) -> None:
    if cfg.name not in ("dense", "constant", "ladder"):
        raise ScheduleError(f"scheduler.name={cfg.name!r} is not one of: dense, constant, ladder")
    if cfg.omit not in OMIT:
        raise ScheduleError(f"scheduler.omit={cfg.omit!r} is not one of: {', '.join(OMIT)}")
    backward = cfg.omit == "backward"  # a backward-only omission may drop every channel (rate 1)
    if not (0.0 <= cfg.rate <= 1.0 if backward else 0.0 <= cfg.rate < 1.0):
        raise ScheduleError(f"scheduler.rate={cfg.rate} must be in {'[0, 1]' if backward else '[0, 1)'}")
    if cfg.attn_rate is not None and not 0.0 <= cfg.attn_rate < 1.0:
        raise ScheduleError(f"scheduler.attn_rate={cfg.attn_rate} must be in [0, 1)")
    attn = cfg.heads_rate()
    if backward and attn and cfg.name != "dense":
        raise ScheduleError(f"scheduler.omit=backward omits MLP channels only: set scheduler.attn_rate=0 "
                            f"(it is {cfg.attn_rate}{', the rate' if cfg.attn_rate is None else ''})")
    if cfg.layer_scale is not None:
        if not cfg.layer_scale or min(cfg.layer_scale) < 0.0:
            raise ScheduleError(f"scheduler.layer_scale={list(cfg.layer_scale)} must be one non-negative value per layer")
        top = cfg.rate * max(cfg.layer_scale)
        if top > 1.0 + 1e-6 or (top >= 1.0 and not backward):  # (backward: a product rounded above 1 is 1)
            raise ScheduleError(
                f"scheduler.rate={cfg.rate} x scheduler.layer_scale (up to {max(cfg.layer_scale):g}) reaches "
                f"{'beyond ' if backward else ''}1 in some layer; lower the rate"
            )
        if cfg.layers is not None:
            raise ScheduleError("scheduler.layer_scale and scheduler.layers exclude each other (a scale of 0 keeps a layer dense)")
    for key, value in (("scheduler.sparse_fraction", cfg.sparse_fraction), ("scheduler.dense_fraction", cfg.dense_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ScheduleError(f"{key}={value} must be in [0, 1]")
    if cfg.name == "ladder":
        if cfg.ladder_steps < 0:
            raise ScheduleError(f"scheduler.ladder_steps={cfg.ladder_steps} must be non-negative")
        if cfg.sparse_fraction + cfg.dense_fraction > 1.0:
            raise ScheduleError(
                f"scheduler.sparse_fraction + scheduler.dense_fraction = {cfg.sparse_fraction + cfg.dense_fraction:g} exceeds the run (1.0)"
            )


def build_stages(cfg: SchedulerConfig, max_steps: int) -> list[Stage]:
    """The run's stages in order; they cover steps 0 .. max_steps - 1 exactly."""
    validate(cfg)
    vector = None if cfg.layer_scale is None else tuple(min(1.0, cfg.rate * float(s)) for s in cfg.layer_scale)
    mlp = cfg.rate if vector is None else sum(vector) / len(vector)
    attn = cfg.heads_rate()
    if cfg.name == "dense" or (mlp == 0.0 and attn == 0.0):
        return [Stage("dense", 0, max_steps, 0.0, 0.0)]

    def sparse(name: str, start: int, end: int, scale: float) -> Stage:
        layer_rates = None if vector is None else tuple(r * scale for r in vector)
        return Stage(name, start, end, mlp * scale, attn * scale, layer_rates)

    if cfg.name == "constant":
        return [sparse("sparse", 0, max_steps, 1.0)]
    sparse_end = round(cfg.sparse_fraction * max_steps)
    dense_start = max_steps - round(cfg.dense_fraction * max_steps)
    n = fitting_rungs(cfg, max_steps)  # a short run takes the rungs that fit, one step each at least
    ladder_len = dense_start - sparse_end
    stages = [sparse("sparse", 0, sparse_end, 1.0)]
    bounds = [sparse_end + round(i * ladder_len / n) for i in range(n + 1)] if n else [sparse_end]
    for i in range(n):
        keep = (n - i) / (n + 1)  # ladder rung i+1 of n: rate * n/(n+1), ..., rate * 1/(n+1)
        stages.append(sparse(f"ladder-{i + 1}", bounds[i], bounds[i + 1], keep))
    if bounds[-1] < max_steps:
        stages.append(Stage("dense", bounds[-1], max_steps, 0.0, 0.0))
    return [s for s in stages if s.steps > 0]


def fitting_rungs(cfg: SchedulerConfig, max_steps: int) -> int:
    """The ladder's rungs in a run of ``max_steps``: ``ladder_steps``, or as many as the steps
    between the sparse and the dense part hold when that is fewer (each rung one step at least)."""
    ladder_len = max_steps - round(cfg.dense_fraction * max_steps) - round(cfg.sparse_fraction * max_steps)
    return max(0, min(cfg.ladder_steps, ladder_len))


def stage_at(stages: list[Stage], step: int) -> Stage:
    for stage in stages:
        if stage.start <= step < stage.end:
            return stage
    return stages[-1]
