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
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from satrun.sat import importance, selection
from satrun.sat.settings import FILLS, NORMALIZE, OMIT, SELECTORS, SPARSE_TOKENS, MetricConfig, SelectorConfig
from satrun.sat.sparse_ops import exact_forward_swiglu, gathered_linear, sparse_swiglu, token_split_swiglu


class UnsupportedModel(ValueError):
    """The model's layers are not of the Llama family (Llama, Mistral, Qwen2, ...)."""


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. during activation-checkpoint recompute."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _LayerSlot:
    """What a patched module needs: its controller, its layer index, its last selection."""

    owner: "Sparsifier"
    layer: int
    last: Any = None
    internals: Any = None  # attention: the transformers functions of the model's family (_attention_internals)


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
        decoder = _decoder_layers(self.model)
        chosen = range(len(decoder)) if self.layers is None else sorted(set(self.layers))
        bad = [i for i in chosen if not 0 <= i < len(decoder)]
        if bad:
            raise ValueError(f"scheduler.layers: {bad} outside the model's {len(decoder)} layers")
        resolved = {i: _check_layer(decoder[i], i) for i in chosen}  # every layer checked before any is patched
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
            for module, forward in ((layer.mlp, _mlp_forward), (layer.self_attn, _attention_forward)):
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


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    if hasattr(model, "get_base_model"):  # a peft model: the transformers model it adapts
        model = model.get_base_model()
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UnsupportedModel(f"{type(model).__name__}: no decoder layers at model.layers")
    return layers


# Attention and MLP classes whose forward the sparse path reproduces exactly. Others (q/k norms,
# logit soft-capping, QKV clipping, other activations) would silently compute something else.
SUPPORTED_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
SUPPORTED_MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}


def _check_layer(layer: torch.nn.Module, index: int) -> tuple[dict[str, Optional["_Lora"]], "_AttentionInternals"]:
    """Refuse a layer the sparse path would not compute exactly; else its projections' LoRA
    adapters (None: a plain projection) and its attention's transformers functions."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(attn).__name__ not in SUPPORTED_ATTENTION or type(mlp).__name__ not in SUPPORTED_MLP:
        raise UnsupportedModel(
            f"layer {index}: {type(attn).__name__}/{type(mlp).__name__} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ATTENTION))} with their MLPs)"
        )
    probe = torch.linspace(-4, 4, 17)
    is_silu = torch.allclose(mlp.act_fn(probe), torch.nn.functional.silu(probe))
    if not is_silu or _base(mlp.gate_proj).bias is not None:
        raise UnsupportedModel(f"layer {index}: only SiLU-gated MLPs without bias are supported")
    adapters = {f"{part}.{name}": _resolve_lora(layer.get_submodule(f"{part}.{name}"), f"layer {index} {part}.{name}")
                for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                    ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names}
    return adapters, _attention_internals(attn)


@dataclass(frozen=True)
class _AttentionInternals:
    """The functions of the model family's transformers module that the sparse attention calls."""

    apply_rotary_pos_emb: Any
    eager_attention_forward: Any


def _attention_internals(attn: torch.nn.Module) -> _AttentionInternals:
    """Looked up once, where the attention class is defined (each family has its own copies);
    a transformers release that moves them is one clear error rather than a failure mid-step."""
    import transformers

    module = sys.modules[type(attn).__module__]
    missing = [name for name in ("apply_rotary_pos_emb", "eager_attention_forward") if not hasattr(module, name)]
    if missing:
        raise UnsupportedModel(f"{module.__name__} (transformers {transformers.__version__}) has no {', '.join(missing)}, "
                               "which the sparse attention calls; use the transformers release in constraints.txt")
    return _AttentionInternals(module.apply_rotary_pos_emb, module.eager_attention_forward)


# --- LoRA adapters (peft) on the projections ----------------------------------------------------


def _base(linear: torch.nn.Module) -> torch.nn.Module:
    """The projection's own linear layer: itself, or the base layer a peft adapter wraps."""
    return getattr(linear, "base_layer", linear)


@dataclass(frozen=True)
class _Lora:
    """A projection's LoRA adapter as resolved when its layer is patched: the A and B modules
    (their weights are read at each use: FSDP2 replaces parameters when it wraps the model)."""

    a: torch.nn.Module
    b: torch.nn.Module
    scale: float
    dropout: torch.nn.Module


def _lora_of(linear: torch.nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor, float, Any]]:
    """(A, B, scaling, dropout) of a patched layer's LoRA projection, or None for a plain one."""
    lora = getattr(linear, "_sat_lora", None)
    return None if lora is None else (lora.a.weight, lora.b.weight, lora.scale, lora.dropout)


def _resolve_lora(linear: torch.nn.Module, where: str) -> Optional[_Lora]:
    """A peft LoRA projection's adapter, or None for a plain one. An adapter layout the sparse
    path does not compute exactly (several active adapters, merged weights, DoRA, adapter
    biases, other adapter kinds) is an error, not a silent fallback."""
    if not hasattr(linear, "base_layer"):
        return None
    active = list(getattr(linear, "active_adapters", []))
    if not hasattr(linear, "lora_A") or len(active) != 1 or active[0] not in linear.lora_A:
        raise UnsupportedModel(f"{where}: SAT computes one active LoRA adapter per projection ({type(linear).__name__}, "
                               f"active {active})")
    name = active[0]
    if linear.merged or linear.use_dora.get(name) or (getattr(linear, "lora_bias", {}) or {}).get(name) \
            or linear.lora_B[name].bias is not None:
        raise UnsupportedModel(f"{where}: SAT computes plain LoRA adapters (not merged, no DoRA, no adapter bias)")
    return _Lora(linear.lora_A[name], linear.lora_B[name], float(linear.scaling[name]), linear.lora_dropout[name])


def _sparse_linear(linear: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, dim: int, regather: bool) -> torch.Tensor:
    """The projection restricted to output rows ``idx`` (dim 0) or to input columns ``idx`` (dim
    1, ``x`` holding only those features), its LoRA branch restricted alike: the kept rows of B,
    or the kept columns of A. The base weight's slice gets no gradient when it is frozen."""
    base = _base(linear)
    y = gathered_linear(x, base.weight, base.bias, idx, dim, regather)
    lora = _lora_of(linear)
    if lora is None:
        return y
    a, b, scale, dropout = lora
    if dim == 0:
        branch = F.linear(F.linear(dropout(x), a), b.index_select(0, idx))
    else:
        branch = F.linear(F.linear(dropout(x), a.index_select(1, idx)), b)
    return y + scale * branch.to(y.dtype)


# --- patched forwards: ``self`` is the model's own MLP / attention module ----------------------


def _mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self._sat.owner.omit == "backward":
        return _exact_forward_mlp(self, x)
    selected = _mlp_selection(self, x)
    if selected is None:
        return type(self).forward(self, x)
    kept, fill_out, rows = selected
    owner = self._sat.owner
    if any(_lora_of(p) is not None for p in (self.gate_proj, self.up_proj, self.down_proj)):
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
        hidden = F.silu(_sparse_linear(self.gate_proj, xs, kept, 0, regather)) * _sparse_linear(self.up_proj, xs, kept, 0, regather)
        out = _sparse_linear(self.down_proj, hidden, kept, 1, regather)
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
    if not _in_backward() or slot.last is None:
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
            slot.last = (kept, _omitted_mean_output(mean, w_down, kept, _lora_of(self.down_proj)) if fill else None, rows)
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
        if _in_backward() and slot.last is not None:  # activation checkpointing's recompute
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


def _select_heads(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """(kept query heads, KV heads to compute or None for all, kept query heads per KV head).

    Under multi-head attention query heads are chosen freely and only the kept heads' keys and
    values are computed. Under grouped-query attention the same number of query heads is chosen
    in every KV group (:func:`selection.kept_heads`), all KV heads are computed by the module's
    own projections (they are few, and a data-dependent subset would force a device sync), and
    the kernel attends grouped (SDPA's ``enable_gqa``, as in the dense path) with no copy of K
    and V per kept query head.
    """
    owner: Sparsifier = module._sat.owner
    d = module.head_dim
    n_q, n_kv = module.q_proj.weight.shape[0] // d, module.k_proj.weight.shape[0] // d
    flat = x.detach().reshape(-1, x.shape[-1])
    scores = importance.head_scores(
        owner.metric.name, flat, module.q_proj.weight, module.k_proj.weight, module.v_proj.weight, module.o_proj.weight, d,
        owner.metric.token_stride, owner.generator(x.device),
    )
    scores = owner.agree(scores)
    if n_q == n_kv:
        heads = owner.choose(scores[None], selection.kept_heads(n_q, n_kv, owner.attn_rate), x.device)[0]
        return heads, heads, 1
    group = n_q // n_kv
    per_group = selection.kept_heads(n_q, n_kv, owner.attn_rate) // n_kv
    chosen = owner.choose(scores.view(n_kv, group), per_group, x.device)  # sorted within each group
    heads = (chosen + group * torch.arange(n_kv, device=chosen.device)[:, None]).flatten()
    return heads, None, per_group


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _project(linear: torch.nn.Linear, x: torch.Tensor, rows: Optional[torch.Tensor], regather: bool) -> torch.Tensor:
    """The projection's output rows ``rows``, or all of them (None, through the module itself)."""
    return linear(x) if rows is None else _sparse_linear(linear, x, rows, 0, regather)


@torch.compiler.disable
def _attention_selection(self: torch.nn.Module, hidden_states: torch.Tensor) -> Optional[tuple]:
    """(kept heads, their q rows, KV rows or None, kept heads per KV head) for this forward, or
    None where the attention computes densely; outside torch.compile's graphs, as
    :func:`_mlp_selection`."""
    slot: _LayerSlot = self._sat
    owner = slot.owner
    if not self.training or owner.attn_rate == 0.0:
        return None
    if not _in_backward() or slot.last is None:
        with torch.no_grad(), owner._clock.measure(hidden_states.device):
            q_heads, kv_heads, per_kv = _select_heads(self, hidden_states)
            kv_rows = None if kv_heads is None else _rows(kv_heads, self.head_dim)
            slot.last = (q_heads, _rows(q_heads, self.head_dim), kv_rows, per_kv)
    return slot.last


def _attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    selected = _attention_selection(self, hidden_states)
    if selected is None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
    kwargs.pop("cache", None), kwargs.pop("past_key_values", None)  # training: no KV cache is kept
    _, q_rows, kv_rows, per_kv = selected
    owner = self._sat.owner
    batch, length, _ = hidden_states.shape
    d = self.head_dim
    q, k, v = (_project(proj, hidden_states, rows, owner.regather) for proj, rows in
               ((self.q_proj, q_rows), (self.k_proj, kv_rows), (self.v_proj, kv_rows)))
    q, k, v = (t.view(batch, length, -1, d).transpose(1, 2) for t in (q, k, v))
    internals: _AttentionInternals = self._sat.internals
    cos, sin = position_embeddings
    q, k = internals.apply_rotary_pos_emb(q, k, cos, sin)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, internals.eager_attention_forward)
    view = types.SimpleNamespace(  # the module as the attention kernel sees it: fewer heads
        num_key_value_groups=per_kv, is_causal=True, training=True, config=self.config,
        layer_idx=getattr(self, "layer_idx", None), head_dim=d, scaling=self.scaling,
    )
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    extra = {"sliding_window": window} if window else {}
    out, weights = attend(
        view, q, k, v, attention_mask, dropout=self.attention_dropout, scaling=self.scaling, **extra, **kwargs
    )
    out = out.reshape(batch, length, -1).contiguous()
    return _sparse_linear(self.o_proj, out, q_rows, 1, owner.regather), weights
