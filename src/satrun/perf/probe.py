"""What SAT's sub-networks cost in loss, measured before any training; and per-layer rates from it.

``satrun probe`` runs forwards only (no optimizer, no gradients) on a few real batches:

1. the dense loss;
2. the loss of the sub-network at each (metric, uniform MLP rate), neurons chosen per layer and
   micro-batch exactly as in training (the sparse path in training mode, no gradient);
3. each layer's sensitivity: the loss increase when that layer alone omits ``layer_rate`` of its
   MLP channels (the configured metric). The layers before it compute what the dense forward
   did, so each layer's input is kept from one dense pass and only the layers from it on run
   again (on average half a forward per layer);
4. with a target speed-up, per-layer rates that reach it (the FLOP model's ideal speed-up of
   the sparse stage) at the least predicted loss increase, then the measured loss of those rates
   next to a uniform rate of equal FLOPs.

The prediction behind 4: omitting rate r in layer l alone costs about
``sensitivity[l] * g(r) / g(layer_rate)``, where g is the configured metric's uniform-rate curve
of step 2 (loss increase against rate, piecewise linear through 0). Rates are raised in steps of
``step``, up to the largest measured rate, on the layer whose next step costs least, until the
target is met.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Optional, Sequence, Union

import torch

from satrun.data import label_tokens, token_rows
from satrun.sat.settings import MetricConfig, SelectorConfig
from satrun.sat.sparsifier import Sparsifier
from satrun.labels import IGNORE
from satrun.training.loss import causal_lm_loss, linear_cross_entropy

Speedup = Callable[[Union[float, Sequence[float]]], float]  # MLP rate(s) -> the ideal speed-up of a sparse step


def _use(sparsifier: Sparsifier, batch: dict) -> None:
    """A token-aware sparsifier learns the batch's dense and sparse rows."""
    if sparsifier.tokens != "all":
        sparsifier.set_token_rows(*token_rows(batch))


def _loss(model: torch.nn.Module, batches: Sequence[dict], sparsifier: Optional[Sparsifier] = None,
          mlp_rate: Any = 0.0, attn_rate: float = 0.0) -> float:
    """Mean loss over ``batches`` (the sub-network's when a sparsifier is given)."""
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if sparsifier is not None:
                sparsifier.set_rates(mlp_rate, attn_rate, step=i)  # a fresh, seeded draw per batch
                _use(sparsifier, batch)
            losses.append(causal_lm_loss(model, batch, label_tokens(batch)).item())  # the training loss, chunked
    return statistics.mean(losses)


def measure(
    model: torch.nn.Module,
    batches: Sequence[dict],
    metrics: Sequence[str],
    rates: Sequence[float],
    metric: MetricConfig,
    selector: SelectorConfig,
    layer_rate: float,
    attn_rate: float = 0.0,
    seed: int = 0,
    tokens: str = "all",
) -> dict[str, Any]:
    """Dense loss, loss per (metric, rate), and each layer's loss increase at ``layer_rate``.

    The sub-networks are computed as in training (train mode, sparse path); ``metric`` (stride
    and name) and ``selector`` are the configured ones, the metric name replaced per row;
    ``tokens`` which tokens omit neurons (``unlabelled``: the loss is then the answers' loss with
    the prompts computed sparsely)."""
    model.train()  # the sparse path runs in training mode; Llama-family models have no dropout here
    dense = _loss(model, batches)
    curves: dict[str, list[float]] = {}
    for name in metrics:
        sat = Sparsifier(model, MetricConfig(name=name, token_stride=metric.token_stride), selector, seed=seed, tokens=tokens)
        try:
            curves[name] = [_loss(model, batches, sat, rate, attn_rate) for rate in rates]
        finally:
            sat.remove()
    sat = Sparsifier(model, metric, selector, seed=seed, tokens=tokens)
    try:
        sensitivity = _sensitivity(model, batches, sat, layer_rate, attn_rate, dense)
    finally:
        sat.remove()
    return {"dense_loss": dense, "rates": list(rates), "loss": curves, "layer_rate": layer_rate,
            "sensitivity": sensitivity}


def _layer_inputs(model: torch.nn.Module, batch: dict) -> list[tuple[tuple, dict]]:
    """Each decoder layer's call (positional and keyword arguments) in a dense forward of ``batch``."""
    layers = model.model.layers
    calls: list[tuple[tuple, dict]] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            model.model(**inputs, use_cache=False)  # position ids: packed rows keep their chats apart
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _sensitivity(model: torch.nn.Module, batches: Sequence[dict], sat: Sparsifier, layer_rate: float,
                 attn_rate: float, dense: float) -> list[float]:
    """Loss increase with each layer alone at ``layer_rate``, from that layer's kept dense input."""
    n = sat.num_layers
    increases = [0.0] * n
    for i, batch in enumerate(batches):
        sat.set_rates(0.0, 0.0, step=i)  # the layers' inputs of a dense forward
        calls = _layer_inputs(model, batch)
        targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:].flatten()
        for layer in range(n):
            sat.set_rates([layer_rate if j == layer else 0.0 for j in range(n)], attn_rate, step=i)
            _use(sat, batch)
            with torch.no_grad():
                args, kwargs = calls[layer]
                hidden = args[0] if args else kwargs["hidden_states"]
                for j in range(layer, n):
                    rest = {k: v for k, v in calls[j][1].items() if k != "hidden_states"}
                    hidden = model.model.layers[j](hidden, *calls[j][0][1:], **rest)
                hidden = model.model.norm(hidden)
                loss = linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets) / label_tokens(batch)
            increases[layer] += loss.item() / len(batches)
    return [x - dense for x in increases]


def _curve(rates: Sequence[float], increases: Sequence[float]) -> Any:
    """g(r): the loss increase at uniform rate r, piecewise linear through (0, 0), extended
    linearly past the last measured rate; never negative and never decreasing."""
    points = [(0.0, 0.0)] + sorted(zip(rates, increases))
    ys, best = [], 0.0
    for _, y in points:  # a noisy dip would make omitting more look free
        best = max(best, y)
        ys.append(best)
    xs = [x for x, _ in points]

    def g(r: float) -> float:
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if r <= x1 or x1 == xs[-1]:
                return y0 + (y1 - y0) * (r - x0) / (x1 - x0)
        return ys[-1]

    return g


def calibrate(
    sensitivity: Sequence[float],
    rates: Sequence[float],
    increases: Sequence[float],
    layer_rate: float,
    speedup: Speedup,
    target_speedup: float,
    step: float = 0.05,
) -> list[float]:
    """Per-layer MLP rates whose ideal speed-up (``speedup(rates)``, the FLOP model's for the
    run's shape and tokens) reaches ``target_speedup`` at the least predicted loss increase
    (module docstring). No layer goes past the largest measured rate (the curve is not
    extrapolated). Raises ValueError if even that rate everywhere falls short."""
    g = _curve(rates, increases)
    max_rate = max(rates)
    scale = g(layer_rate) or 1e-9
    sens = [max(s, 1e-6) for s in sensitivity]  # a layer that measured as harmless still costs a little

    def cost(layer: int, r: float) -> float:
        return sens[layer] * g(r) / scale

    n = len(sens)
    if speedup([max_rate] * n) < target_speedup:
        raise ValueError(f"target speed-up {target_speedup} is beyond reach at rate {max_rate} in every layer")
    chosen = [0.0] * n
    while speedup(chosen) < target_speedup:
        options = [(cost(i, min(max_rate, r + step)) - cost(i, r), i) for i, r in enumerate(chosen) if r < max_rate - 1e-9]
        _, best = min(options)
        chosen[best] = round(min(max_rate, chosen[best] + step), 6)
    return chosen


def uniform_rate_for(speedup: Speedup, target: float) -> float:
    """The smallest uniform MLP rate (to 0.001) whose ideal speed-up ``speedup(rate)`` reaches ``target``."""
    lo, hi = 0.0, 0.999
    for _ in range(40):
        mid = (lo + hi) / 2
        if speedup(mid) >= target:
            hi = mid
        else:
            lo = mid
    return round(hi, 3)


def verify(model: torch.nn.Module, batches: Sequence[dict], metric: MetricConfig, selector: SelectorConfig,
           layer_rates: Sequence[float], uniform: float, attn_rate: float = 0.0, seed: int = 0,
           tokens: str = "all") -> dict[str, float]:
    """Measured loss of the calibrated per-layer rates and of a uniform rate of equal FLOPs."""
    sat = Sparsifier(model, metric, selector, seed=seed, tokens=tokens)
    try:
        return {"calibrated_loss": _loss(model, batches, sat, list(layer_rates), attn_rate),
                "uniform_loss": _loss(model, batches, sat, uniform, attn_rate)}
    finally:
        sat.remove()


def print_probe(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"sub-network loss by metric and MLP rate (dense {result['dense_loss']:.3f})")
    table.add_column("metric")
    for rate, speedup in zip(result["rates"], result["ideal_speedups"]):
        table.add_column(f"r={rate:g} ({speedup:.2f}x)", justify="right")
    for name, losses in result["loss"].items():
        table.add_row(name, *(f"{x:.3f}" for x in losses))
    console.print(table)
    console.print(_layer_table(f"layer sensitivity: loss increase with one layer at rate {result['layer_rate']:g} "
                               f"({result['metric']})", "loss increase", [f"{s:+.3f}" for s in result["sensitivity"]]))
    if "calibration" in result:
        c = result["calibration"]
        console.print(
            f"target {c['target_speedup']:.2f}x: per-layer rates (mean {c['mean_rate']:.3f}, ideal {c['ideal_speedup']:.2f}x) "
            f"loss {c['calibrated_loss']:.3f}; uniform rate {c['uniform_rate']:.3f} of equal FLOPs: loss {c['uniform_loss']:.3f}"
        )


# --- omit=backward: the forward is exact, so the screen compares gradients, not losses ---------


def _gradients(model: torch.nn.Module, batches: Sequence[dict], sparsifier: Optional[Sparsifier] = None,
               mlp_rate: Any = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The training gradient over ``batches`` (one step's, every batch weighing its labelled
    tokens), flat: all parameters, and each decoder layer's."""
    model.zero_grad(set_to_none=True)
    total = sum(label_tokens(b) for b in batches)
    for i, batch in enumerate(batches):
        if sparsifier is not None:
            sparsifier.set_rates(mlp_rate, 0.0, step=i)
            _use(sparsifier, batch)
        causal_lm_loss(model, batch, total).backward()

    def flat(params: Any) -> torch.Tensor:
        return torch.cat([p.grad.detach().float().flatten() for p in params if p.grad is not None])

    layers = [flat(layer.parameters()) for layer in model.model.layers]
    whole = flat(model.parameters())
    model.zero_grad(set_to_none=True)
    return whole, layers


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flat gradients, summed in float64 (over ~1e8 elements float32 sums drift by 1e-4)."""
    a, b = a.double(), b.double()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def gradient_agreement(
    model: torch.nn.Module,
    batches: Sequence[dict],
    rates: Sequence[float],
    metric: MetricConfig,
    selector: SelectorConfig,
    layer_rate: float,
    seed: int = 0,
    tokens: str = "all",
) -> dict[str, Any]:
    """The screen of ``omit=backward`` (dense forward, the sparse tokens' MLP backward on the kept
    channels): how close its gradient is to the dense one, as the cosine of the whole gradient
    and of each decoder layer's, at each uniform MLP rate; and each layer's sensitivity, one
    minus the whole gradient's cosine with that layer alone at ``layer_rate``."""
    model.train()
    dense, dense_layers = _gradients(model, batches)
    sat = Sparsifier(model, metric, selector, seed=seed, tokens=tokens, omit="backward")
    try:
        cosine, layer_cosine, norm_ratio = [], [], []
        for rate in rates:
            whole, layers = _gradients(model, batches, sat, rate)
            cosine.append(_cosine(whole, dense))
            norm_ratio.append((whole.norm() / dense.norm()).item())
            layer_cosine.append([_cosine(a, b) for a, b in zip(layers, dense_layers)])
        n = sat.num_layers
        sensitivity = [1.0 - _cosine(_gradients(model, batches, sat, [layer_rate if j == i else 0.0 for j in range(n)])[0],
                                     dense) for i in range(n)]
    finally:
        sat.remove()
    return {"omit": "backward", "rates": list(rates), "gradient_cosine": cosine, "gradient_norm_ratio": norm_ratio,
            "layer_gradient_cosine": layer_cosine, "layer_rate": layer_rate, "sensitivity": sensitivity}


def print_gradient_probe(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="omit=backward: the gradient against the dense one, by uniform MLP rate")
    for column in ("rate", "ideal speed-up", "cosine", "norm ratio", "layer cosine: min / median"):
        table.add_column(column, justify="right")
    for i, rate in enumerate(result["rates"]):
        layers = result["layer_gradient_cosine"][i]
        table.add_row(f"{rate:g}", f"{result['ideal_speedups'][i]:.2f}x", f"{result['gradient_cosine'][i]:.4f}",
                      f"{result['gradient_norm_ratio'][i]:.3f}", f"{min(layers):.3f} / {statistics.median(layers):.3f}")
    console.print(table)
    console.print(_layer_table(f"layer sensitivity: 1 - cosine of the whole gradient with one layer at rate "
                               f"{result['layer_rate']:g}", "1 - cosine", [f"{s:.4f}" for s in result["sensitivity"]]))


def _layer_table(title: str, column: str, values: list[str]) -> Any:
    """One value per decoder layer, ten layers to a row."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layers")
    table.add_column(column, justify="right")
    for start in range(0, len(values), 10):
        table.add_row(f"{start}-{min(start + 9, len(values) - 1)}", " ".join(values[start:start + 10]))
    return table
