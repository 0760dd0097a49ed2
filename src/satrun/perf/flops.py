"""FLOPs per token of a Llama-family decoder, dense and under SAT.

One multiply-add counts 2 FLOPs; backward costs twice the forward. Per token and layer, with
h hidden, i intermediate, n_q / n_kv heads of size d and sequence length s (causal attention
sees s/2 keys on average):

    q and o projections   2 h (n_q d) each          scale with the kept heads
    k and v projections   2 h (n_kv d) each         scale with the kept KV heads
    attention core        4 (n_q d) (s / 2)         scales with the kept heads
    MLP                   6 h i                     scales with the kept channels
    LM head               2 h V                     once per token, never omitted

With LoRA (``Shape.lora_rank``) the base weights are frozen: their products have no weight
gradient, so they cost twice their forward, not three times; the rank-r adapters on every
projection add 2 r (in + out) per projection and token, restricted to the kept neurons, at three
times; the attention core keeps its three.

Kept fractions are the exact ones SAT uses (``kept_count``, with ``selector.align``): heads
k/n_q, channels k/i, layer by layer (a rate per layer, or one rate on the sparsified layers and
none elsewhere). Under multi-head attention the KV heads follow the kept heads; under
grouped-query attention satrun computes every KV head, so k and v do not shrink.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

from satrun.sat.selection import kept_count, kept_heads


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False  # the LM head shares the input embedding (one matrix, counted once)
    lora_rank: int = 0  # LoRA adapters of this rank on every projection, the base frozen (0: full fine-tuning)

    @classmethod
    def from_config(cls, config: Any) -> "Shape":
        """From a transformers config (Llama, Mistral, Qwen2, ...)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class TokenFlops:
    """Forward FLOPs per token, by part, summed over layers."""

    attn_proj: float
    attn_core: float
    mlp: float
    lm_head: float
    adapters: float = 0.0  # LoRA branches
    frozen: bool = False  # the base weights get no gradient (LoRA)

    @property
    def forward(self) -> float:
        return self.attn_proj + self.attn_core + self.mlp + self.lm_head + self.adapters

    @property
    def train(self) -> float:
        """Forward plus backward: twice the forward; with frozen base weights their products
        need the input gradient only (once more their forward)."""
        if not self.frozen:
            return 3.0 * self.forward
        return 3.0 * (self.attn_core + self.adapters) + 2.0 * (self.attn_proj + self.mlp + self.lm_head)

    @property
    def head_train(self) -> float:
        """The LM head's part of :attr:`train`."""
        return (2.0 if self.frozen else 3.0) * self.lm_head

    def as_dict(self) -> dict[str, float]:
        parts = {k: v for k, v in asdict(self).items() if k != "frozen"}
        return {**parts, "forward": self.forward, "backward": self.train - self.forward, "train": self.train}


Rates = Union[float, Sequence[float]]


def _per_layer(rate: Rates, n_layers: int, layers: Optional[Sequence[int]]) -> list[float]:
    if not isinstance(rate, (int, float)):
        if len(rate) != n_layers:
            raise ValueError(f"{len(rate)} layer rates for a model of {n_layers} layers")
        return [float(r) for r in rate]
    chosen = set(range(n_layers)) if layers is None else set(layers)
    return [float(rate) if i in chosen else 0.0 for i in range(n_layers)]


def token_flops(
    shape: Shape, seq_len: int, mlp_rate: Rates = 0.0, attn_rate: Rates = 0.0, align: int = 1,
    layers: Optional[Sequence[int]] = None,
) -> TokenFlops:
    """FLOPs per token at the given omission rates (0, 0 = dense): one rate for the layers in
    ``layers`` (None: all), or a sequence of one rate per layer."""
    h, d = shape.hidden, shape.head_dim
    q_width, kv_width = shape.heads * d, shape.kv_heads * d
    proj = core = mlp = adapters = 0.0
    r, i = shape.lora_rank, shape.intermediate
    for mlp_r, attn_r in zip(_per_layer(mlp_rate, shape.layers, layers), _per_layer(attn_rate, shape.layers, layers)):
        mlp_keep = (0.0 if mlp_r >= 1.0 else kept_count(i, mlp_r, align) / i) if mlp_r else 1.0
        head_keep = kept_heads(shape.heads, shape.kv_heads, attn_r) / shape.heads if attn_r else 1.0
        kv_keep = head_keep if shape.heads == shape.kv_heads else 1.0
        proj += 2 * h * q_width * 2 * head_keep + 2 * h * kv_width * 2 * kv_keep
        core += 4 * q_width * (seq_len / 2) * head_keep
        mlp += 6 * h * i * mlp_keep
        # q, o; k, v; gate, up, down: 2 r (in + out) each, the kept side restricted
        adapters += 2 * r * (2 * (h + q_width * head_keep) + 2 * (h + kv_width * kv_keep) + 3 * (h + i * mlp_keep))
    return TokenFlops(attn_proj=proj, attn_core=core, mlp=mlp, lm_head=2 * h * shape.vocab, adapters=adapters,
                      frozen=r > 0)


def ideal_speedup(
    shape: Shape, seq_len: int, mlp_rate: Rates, attn_rate: Rates, align: int = 1, layers: Optional[Sequence[int]] = None,
) -> float:
    """Dense training FLOPs over SAT training FLOPs: the speed-up if scoring were free."""
    return token_flops(shape, seq_len).train / token_flops(shape, seq_len, mlp_rate, attn_rate, align, layers).train


TOKENS = ("all", "unlabelled")  # which tokens a sparse step computes sparsely (scheduler.tokens)
OMIT = ("forward", "backward")  # where a sparse token omits neurons (scheduler.omit)


def step_flops(
    shape: Shape, seq_len: int, counts: Sequence[int], mlp_rate: Rates = 0.0, attn_rate: Rates = 0.0, align: int = 1,
    layers: Optional[Sequence[int]] = None, tokens: str = "all", omit: str = "forward",
) -> float:
    """Training FLOPs of one micro-batch whose rows are ``seq_len`` long, from its token counts
    (labelled, unlabelled, padding): every token runs the decoder, sparsely at the given rates
    where ``tokens`` makes it sparse (all of them, or the ``unlabelled`` ones and padding, the
    labelled ones then running the full layers); the LM head runs at the labelled tokens only.

    ``omit=forward``: a sparse token's omitted neurons are left out of its forward and backward
    (the paper's sub-network). ``omit=backward``: its forward is dense and only its MLP backward
    products (the weight and the input gradient's, twice the forward; the input gradient's alone
    over a frozen base) shrink to the kept channels; at rate 1 they vanish. Counts ``(1, 0, 0)``
    give the FLOPs of one CPT token."""
    if tokens not in TOKENS:
        raise ValueError(f"tokens={tokens!r} is not one of: {', '.join(TOKENS)}")
    if omit not in OMIT:
        raise ValueError(f"omit={omit!r} is not one of: {', '.join(OMIT)}")
    labelled, unlabelled, padding = counts
    dense = token_flops(shape, seq_len)
    sparse = token_flops(shape, seq_len, mlp_rate, attn_rate, align, layers)
    decoder = {f: f.train - f.head_train for f in (dense, sparse)}  # training FLOPs per token, LM head aside
    if omit == "backward":  # the forward dense; the MLP's backward products at the kept fraction
        decoder[sparse] = decoder[dense] - (1.0 if dense.frozen else 2.0) * (dense.mlp - sparse.mlp)
    sparse_n = labelled + unlabelled + padding if tokens == "all" else unlabelled + padding
    dense_n = labelled + unlabelled + padding - sparse_n
    return dense_n * decoder[dense] + sparse_n * decoder[sparse] + labelled * dense.head_train
