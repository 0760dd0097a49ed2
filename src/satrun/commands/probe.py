"""``satrun probe``: forward passes only: sub-network losses per metric and rate, layer
sensitivities, calibrated per-layer rates; with ``scheduler.omit=backward`` the gradients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from transformers import PreTrainedModel

from satrun.config import TrainConfig, sparse_tokens
from satrun.data import BatchStream, token_counts
from satrun.errors import UsageError
from satrun.inputs import load_inputs
from satrun.perf import probe
from satrun.perf.flops import Shape, step_flops
from satrun.plots import probe_plot
from satrun.training import runtime


def run(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
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
    shape, attn, tokens = Shape.from_config(model.config), cfg.scheduler.heads_rate(), sparse_tokens(cfg)
    speedup = _probe_speedup(cfg, shape, batches)
    if backward:
        return _gradient_probe(cfg, model, batches, speedup, run_dir)
    metrics = list(dict.fromkeys([*p.metrics, cfg.metric.name]))  # the configured metric is always measured
    with runtime.precision_context(t.precision, device):
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
    with runtime.precision_context(t.precision, device):
        result = probe.gradient_agreement(model, batches, p.rates, cfg.metric, cfg.selector, p.layer_rate, t.seed,
                                          sparse_tokens(cfg))
    result.update(metric=cfg.metric.name, selector=cfg.selector.name, batches=p.batches, mode=cfg.mode.name,
                  tokens_per_batch=t.micro_batch_size * t.seq_len, sparse_tokens=sparse_tokens(cfg),
                  ideal_speedups=[speedup(r) for r in p.rates])
    (run_dir / "probe.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    probe.print_gradient_probe(result)
    print(f"probe written to {run_dir / 'probe.json'}")
    return result


def _probe_speedup(cfg: TrainConfig, shape: Shape, batches: list[dict]) -> Callable[[Any], float]:
    """The ideal speed-up of a sparse step at the given MLP rate(s): from the shape alone in CPT,
    from the probe batches' labelled / unlabelled / padding tokens in SFT (where only the
    unlabelled ones may be sparse and the LM head runs at the labelled ones)."""
    t, attn = cfg.trainer, cfg.scheduler.heads_rate()
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


def _refuse_adapters(cfg: TrainConfig, command: str) -> None:
    if cfg.adapter.name != "none":
        raise UsageError(f"satrun {command} does not know adapters yet (adapter={cfg.adapter.name}): it would measure "
                         "full fine-tuning; leave adapter out (satrun plan and satrun bench count LoRA)")
