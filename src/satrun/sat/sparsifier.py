"""Make a Hugging Face causal LM train on a per-step subset of its heads and MLP channels.

``Sparsifier(model, ...)`` patches the ``forward`` of each chosen decoder layer's attention and
MLP *instances* (no module is replaced, so parameter names, shapes and the state dict stay the
model's own, and checkpoints stay plain Hugging Face checkpoints). ``set_rates`` sets the
omission rates for the next optimizer step; at rate 0 or in eval mode the original forward runs
unchanged.

``tokens`` says which tokens omit neurons: ``all`` of them, or only the ``unlabelled`` ones
(tokens that carry no loss: prompts and padding in SFT). Under ``unlabelled`` each MLP splits
its input rows in two (``set_token_rows`` gives them before each forward): the unlabelled rows
run through the kept channels, the labelled ones through the whole layer, and both give every
weight its gradient; neurons are scored on the unlabelled rows. Attention heads are not omitted
there (every query row attends to keys and values computed for all rows). In training mode sparsified layers keep no KV cache (training needs none). ``remove`` restores the model.

Each training forward scores the layer's neurons on that micro-batch's input, selects the kept
ones, and computes only them (``sparse_ops``). A forward re-run by activation checkpointing during
backward reuses the selection of the original forward.

``omit`` says where neurons are left out: ``forward`` (the paper's form, above) or ``backward``:
every MLP computes its forward densely and exactly, scores its channels from the sparse rows'
activations of that forward, and runs those rows' backward on the kept channels only
(``sparse_ops.exact_forward_swiglu``); rate 1 keeps none. Heads are not omitted in this form.
"""

from __future__ import annotations

import contextlib
import time
import types
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from satrun.sat import importance, selection
from satrun.sat.attention import attention_forward
from satrun.sat.layers import check_layer, decoder_layers, lora_of, sparse_linear
from satrun.sat.settings import FILLS, NORMALIZE, OMIT, SELECTORS, SPARSE_TOKENS, MetricConfig, SelectorConfig
from satrun.sat.sparse_ops import exact_forward_swiglu, in_backward, sparse_swiglu, token_split_swiglu


@dataclass
class _LayerSlot:
    """What a patched module needs: its controller, its layer index, its last selection."""

    owner: "Sparsifier"
    layer: int
    last: Any = None
    internals: Any = None  # attention: the transformers functions of the model's family (attention_internals)


@dataclass
class Sparsifier:
    model: torch.nn.Module = field(repr=False)
    metric: MetricConfig = field(default_factory=MetricConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    layers: Optional[list[int]] = None
    seed: int = 0
    tokens: str = "all"  # all | unlabelled: which tokens omit neurons (see the module's docstring)
    regather: bool = False  # keep indices, not weight slices, for backward (FSDP2: see sparse_ops)
    omit: str = "forward"  # forward | backward: where omitted neurons are left out (see the module's docstring)

    def __post_init__(self) -> None:
        if self.tokens not in SPARSE_TOKENS:
            raise ValueError(f"tokens={self.tokens!r} is not one of: {', '.join(SPARSE_TOKENS)}")
        if self.omit not in OMIT:
            raise ValueError(f"omit={self.omit!r} is not one of: {', '.join(OMIT)}")
        self._rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if self.metric.name not in importance.METRICS:
            raise ValueError(f"metric.name={self.metric.name!r} is not one of: {', '.join(importance.METRICS)}")
        for key, value, allowed in (("selector.name", self.selector.name, SELECTORS), ("selector.fill", self.selector.fill, FILLS),
                                    ("selector.normalize", self.selector.normalize, NORMALIZE)):
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
        decoder = decoder_layers(self.model)
        chosen = range(len(decoder)) if self.layers is None else sorted(set(self.layers))
        bad = [i for i in chosen if not 0 <= i < len(decoder)]
        if bad:
            raise ValueError(f"scheduler.layers: {bad} outside the model's {len(decoder)} layers")
        resolved = {i: check_layer(decoder[i], i) for i in chosen}  # every layer checked before any is patched
        self.num_layers = len(decoder)
        self.mlp_rate = self.attn_rate = 0.0
        self._mlp_layer_rates: Optional[tuple[float, ...]] = None
        self.step = 0
        self._clock = _Clock()  # time spent scoring and selecting, since creation
        self._generators: dict[torch.device, torch.Generator] = {}
        self._patched: list[torch.nn.Module] = []
        self._adapted = any(lora is not None for adapters, _ in resolved.values() for name, lora in adapters.items()
                            if name.startswith("mlp."))
        self._projections: list[torch.nn.Module] = []
        for i in chosen:
            layer = decoder[i]
            adapters, internals = resolved[i]
            for name, lora in adapters.items():  # resolved once: the forwards read it, they do not look it up
                projection = layer.get_submodule(name)
                projection._sat_lora = lora
                self._projections.append(projection)
            for module, forward in ((layer.mlp, _mlp_forward), (layer.self_attn, attention_forward)):
                module._sat = _LayerSlot(self, i, internals=internals if module is layer.self_attn else None)
                module.forward = types.MethodType(forward, module)
                self._patched.append(module)

    @property
    def select_s(self) -> float:
        """Seconds spent scoring and selecting since creation (on CUDA the device's time; reading it waits for that work)."""
        return self._clock.seconds

    def set_rates(self, mlp_rate: Union[float, Sequence[float]], attn_rate: float, step: int) -> None:
        """Omission rates for optimizer step ``step``; selections are seeded by (seed, step).

        ``mlp_rate`` is one rate for every sparsified layer, or one per decoder layer of the
        model (0 keeps that layer's MLP dense)."""
        if isinstance(mlp_rate, (int, float)):
            self.mlp_rate, self._mlp_layer_rates = float(mlp_rate), None
        else:
            if len(mlp_rate) != self.num_layers:
                raise ValueError(f"{len(mlp_rate)} MLP rates for a model of {self.num_layers} layers")
            self._mlp_layer_rates = tuple(float(r) for r in mlp_rate)
            self.mlp_rate = sum(self._mlp_layer_rates) / self.num_layers
        if self.tokens == "unlabelled" and attn_rate:
            raise ValueError("attention heads are kept when only unlabelled tokens omit neurons (tokens=unlabelled): "
                             f"attention rate {attn_rate} must be 0")
        top = max(self._mlp_layer_rates) if self._mlp_layer_rates is not None else self.mlp_rate
        if self.omit == "backward":
            if attn_rate:
                raise ValueError(f"omit=backward omits MLP channels only: attention rate {attn_rate} must be 0")
            if top > 0.0 and self._adapted:
                raise ValueError("omit=backward computes MLPs without LoRA adapters (use omit=forward with adapters)")
        elif top >= 1.0:
            raise ValueError(f"omit=forward keeps a sub-network: MLP rate {top} must be below 1")
        self.attn_rate, self.step = attn_rate, step
        self._generators.clear()

    def set_token_rows(self, dense: torch.Tensor, sparse: torch.Tensor) -> None:
        """With ``tokens=unlabelled``: the flat rows (``row * length + column`` of the next
        forward's input) computed by the whole layer (tokens that carry a loss) and those
        computed sparsely (the rest); together every row once."""
        self._rows = (dense, sparse)

    def token_rows(self, n: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The (dense, sparse) rows of an MLP input of ``n`` rows; None when every token is sparse."""
        if self.tokens == "all":
            return None
        if self._rows is None or self._rows[0].numel() + self._rows[1].numel() != n:
            raise RuntimeError(f"tokens=unlabelled: no token rows given for this forward of {n} rows (set_token_rows)")
        return self._rows

    def mlp_rate_of(self, layer: int) -> float:
        """The MLP omission rate of decoder layer ``layer`` for the current step."""
        return self.mlp_rate if self._mlp_layer_rates is None else self._mlp_layer_rates[layer]

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self.step)
        return self._generators[device]

    def agree(self, scores: torch.Tensor) -> torch.Tensor:
        """Under data parallelism, the scores of the global batch: every rank then selects the
        same neurons (the selection generator is seeded alike everywhere). maxip's maximum over
        tokens is reduced by maximum, contrib's root of a sum of squares by the root of the summed
        squares (the score of the ranks' tokens together), the other metrics by sum."""
        if not _data_parallel():
            return scores
        reduce = importance.REDUCE[self.metric.name]
        if reduce == "l2":
            scores.square_()
        dist.all_reduce(scores, op=dist.ReduceOp.MAX if reduce == "max" else dist.ReduceOp.SUM)
        return scores.sqrt_() if reduce == "l2" else scores

    def agree_with_mean(self, scores: torch.Tensor, total: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`agree`'s scores, and the mean of vectors whose sum over ``count`` tokens is
        ``total``: under data parallelism over every rank's tokens (their counts differ under
        ``tokens=unlabelled``); no token at all gives zeros. Where the metric's scores are
        reduced by a sum (all but maxip's maximum) both travel in one collective, so a layer
        waits for one reduction, not two."""
        if not _data_parallel():
            return scores, total / max(1, count)
        if importance.REDUCE[self.metric.name] == "max":
            scores = self.agree(scores)
            packed = torch.cat([total.float(), total.new_full((1,), float(count), dtype=torch.float32)])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            return scores, (packed[:-1] / packed[-1:].clamp_min(1.0)).to(total.dtype)
        squared = importance.REDUCE[self.metric.name] == "l2"
        n = scores.numel()
        packed = torch.cat([(scores.square() if squared else scores).float().flatten(), total.float(),
                            total.new_full((1,), float(count), dtype=torch.float32)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        agreed = packed[:n].view_as(scores).to(scores.dtype)
        return (agreed.sqrt_() if squared else agreed), (packed[n:-1] / packed[-1:].clamp_min(1.0)).to(total.dtype)

    def choose(self, scores: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
        if self.selector.name == "topk":
            return selection.topk(scores, k)
        return selection.sample(scores, k, self.selector.temperature, self.generator(device), self.selector.normalize)

    def last_selection(self, layer: int) -> dict[str, Optional[torch.Tensor]]:
        """The kept channels and heads of ``layer`` in its latest sparse forward (None if dense),
        and with ``selector.fill=mean`` the omitted channels' mean output that was added (``fill``)."""
        found = {"channels": None, "heads": None, "fill": None}
        for module in self._patched:
            last = module._sat.last
            if module._sat.layer == layer and last is not None:
                if hasattr(module, "gate_proj"):
                    found["channels"], found["fill"] = last[0], last[1]
                else:
                    found["heads"] = last[0]
        return found

    def remove(self) -> None:
        for module in self._patched:
            del module.forward, module._sat
        for projection in self._projections:
            del projection._sat_lora
        self._patched.clear()
        self._projections.clear()


class _Clock:
    """Time spent in a piece of work, summed: host time on CPU; on CUDA the device's time between
    two events around it (host time there would measure how fast kernels are queued, not how
    long they run), read only when asked, which waits for the last of them."""

    def __init__(self) -> None:
        self._done = 0.0
        self._pending: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            started = time.perf_counter()
            yield
            self._done += time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end))

    @property
    def seconds(self) -> float:
        for start, end in self._pending:
            end.synchronize()
            self._done += start.elapsed_time(end) / 1000
        self._pending.clear()
        return self._done


def _data_parallel() -> bool:
    """Whether several ranks train together (scores and fills are then agreed across them)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --- patched forwards: ``self`` is the model's own MLP / attention module ----------------------


def _mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self._sat.owner.omit == "backward":
        return _exact_forward_mlp(self, x)
    selected = _mlp_selection(self, x)
    if selected is None:
        return type(self).forward(self, x)
    kept, fill_out, rows = selected
    owner = self._sat.owner
    if any(lora_of(p) is not None for p in (self.gate_proj, self.up_proj, self.down_proj)):
        return _adapted_mlp(self, x, kept, fill_out, rows)
    weights = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
    if rows is None:
        out = sparse_swiglu(x, *weights, kept, owner.regather)
        return out if fill_out is None else out + fill_out.to(out.dtype)
    out = token_split_swiglu(x.reshape(-1, x.shape[-1]), *weights, kept, *rows, fill_out,  # rows with a loss: every channel
                             owner.regather)
    return out.view(*x.shape[:-1], out.shape[-1])


def _adapted_mlp(self: torch.nn.Module, x: torch.Tensor, kept: torch.Tensor, fill_out: Optional[torch.Tensor],
                 rows: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The MLP with LoRA projections on the kept channels (each adapter restricted alike), by
    autograd through the sliced products; under the token split the rows with a loss go through
    the whole adapted MLP."""
    regather = self._sat.owner.regather

    def sparse(xs: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(sparse_linear(self.gate_proj, xs, kept, 0, regather)) * sparse_linear(self.up_proj, xs, kept, 0, regather)
        out = sparse_linear(self.down_proj, hidden, kept, 1, regather)
        return out if fill_out is None else out + fill_out.to(out.dtype)

    if rows is None:
        return sparse(x)
    flat = x.reshape(-1, x.shape[-1])
    dense_out = type(self).forward(self, flat.index_select(0, rows[0]))
    sparse_out = sparse(flat.index_select(0, rows[1]))
    out = dense_out.new_empty(flat.shape[0], dense_out.shape[-1])
    out = out.index_copy(0, rows[0], dense_out).index_copy(0, rows[1], sparse_out.to(dense_out.dtype))
    return out.view(*x.shape[:-1], out.shape[-1])


@torch.compiler.disable
def _mlp_selection(self: torch.nn.Module, x: torch.Tensor) -> Optional[tuple]:
    """(kept channels, mean fill or None, token rows or None) for this forward; None where the
    layer computes densely (eval mode, rate 0). A forward re-run by activation checkpointing
    reuses the original forward's selection.

    It runs outside torch.compile's graphs (the layer's products stay in them): it reads a
    clock, seeds generators and asks autograd whether it is recomputing, and its rates are
    host numbers that would otherwise be baked into a graph, so a compiled layer compiles again
    only when the kept counts change its shapes."""
    slot: _LayerSlot = self._sat
    owner = slot.owner
    rate = owner.mlp_rate_of(slot.layer)
    if not self.training or rate == 0.0:
        return None
    if not in_backward() or slot.last is None:
        with torch.no_grad(), owner._clock.measure(x.device):
            flat = x.detach().reshape(-1, x.shape[-1])
            rows = owner.token_rows(flat.shape[0])
            if rows is not None:
                flat = flat.index_select(0, rows[1])  # scores come from the sparse tokens
            w_gate, w_up, w_down, stride = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, owner.metric.token_stride
            fill = owner.selector.fill == "mean"
            act = importance.activations(flat, w_gate, w_up, stride) if fill or owner.metric.name in ("maxip", "contrib") else None
            scores = importance.channel_scores(owner.metric.name, flat, w_gate, w_up, w_down, stride, owner.generator(x.device), act)
            if fill:
                scores, mean = owner.agree_with_mean(scores, act.sum(0), act.shape[0])
            else:
                scores = owner.agree(scores)
            k = selection.kept_count(scores.numel(), rate, owner.selector.align_on(x.device.type))
            kept = owner.choose(scores[None], k, x.device)[0]
            slot.last = (kept, _omitted_mean_output(mean, w_down, kept, lora_of(self.down_proj)) if fill else None, rows)
    return slot.last


@torch.compiler.disable
def _exact_forward_mlp(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``omit=backward``: the MLP's forward exactly as dense; its backward for the sparse rows
    (every row, or the unlabelled ones under the token split) on the kept channels only, chosen
    from those rows' activations in this forward (every row scored: they are computed anyway);
    at rate 1 on none (those rows' MLP branch passes no gradient). Outside torch.compile's
    graphs, as :func:`_mlp_selection` (the selection runs inside the forward)."""
    slot: _LayerSlot = self._sat
    owner = slot.owner
    rate = owner.mlp_rate_of(slot.layer)
    if not self.training or rate == 0.0:
        return type(self).forward(self, x)
    flat = x.reshape(-1, x.shape[-1])
    rows = owner.token_rows(flat.shape[0])
    w_gate, w_up, w_down = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight

    def choose(xs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if in_backward() and slot.last is not None:  # activation checkpointing's recompute
            return slot.last[0]
        with torch.no_grad(), owner._clock.measure(x.device):
            scores = owner.agree(importance.channel_scores(owner.metric.name, xs, w_gate, w_up, w_down, 1,
                                                           owner.generator(x.device), hidden))
            k = selection.kept_count(scores.numel(), rate, owner.selector.align_on(x.device.type))
            kept = owner.choose(scores[None], k, x.device)[0]
        slot.last = (kept, None, rows)
        return kept

    if rate >= 1.0:
        slot.last = None  # nothing is chosen: the sparse rows keep no channel
    dense_rows, sparse_rows = rows if rows is not None else (None, None)
    out = exact_forward_swiglu(flat, w_gate, w_up, w_down, dense_rows, sparse_rows, None if rate >= 1.0 else choose,
                               owner.regather)
    return out.view(*x.shape[:-1], out.shape[-1])


def _omitted_mean_output(mean: torch.Tensor, w_down: torch.Tensor, kept: torch.Tensor,
                         lora: Optional[tuple] = None) -> torch.Tensor:
    """What the omitted channels add to the layer's output on average over the scored tokens
    (``mean``: every channel's mean activation over them, all ranks'):
    W_down[:, omitted] @ mean[omitted], one matrix-vector product with the kept channels'
    means zeroed (no index of the omitted set is formed, so no device sync, and no weight gather).
    It runs in fp32 with autocast off: under autocast the product would cast ``W_down`` to bf16
    and autocast would keep that copy of every layer's weight to the end of the forward (about
    2.9 GB at Llama-2-7B); reading the fp32 weight once for a matrix-vector product costs little."""
    with torch.autocast(w_down.device.type, enabled=False):
        omitted = mean.index_fill_(0, kept, 0.0).to(w_down.dtype)
        out = w_down @ omitted
        if lora is not None:  # the adapted down projection: W + s B A
            a, b, scale, _ = lora
            out = out + scale * (b @ (a @ omitted.to(a.dtype))).to(out.dtype)
        return out


