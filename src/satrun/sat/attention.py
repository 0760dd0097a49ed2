"""The patched attention forward: the kept heads' query rows and their key/value groups'
rows, attended through transformers' attention kernel as a module with fewer heads, out through
the kept columns of ``o_proj``. ``self`` is the model's own attention module."""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from satrun.sat import importance, selection
from satrun.sat.layers import AttentionInternals, sparse_linear
from satrun.sat.sparse_ops import in_backward


def _select_heads(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """(kept query heads, KV heads to compute or None for all, kept query heads per KV head).

    Under multi-head attention query heads are chosen freely and only the kept heads' keys and
    values are computed. Under grouped-query attention the same number of query heads is chosen
    in every KV group (:func:`selection.kept_heads`), all KV heads are computed by the module's
    own projections (they are few, and a data-dependent subset would force a device sync), and
    the kernel attends grouped (SDPA's ``enable_gqa``, as in the dense path) with no copy of K
    and V per kept query head.
    """
    owner = module._sat.owner  # the Sparsifier
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
    return linear(x) if rows is None else sparse_linear(linear, x, rows, 0, regather)


@torch.compiler.disable
def _attention_selection(self: torch.nn.Module, hidden_states: torch.Tensor) -> Optional[tuple]:
    """(kept heads, their q rows, KV rows or None, kept heads per KV head) for this forward, or
    None where the attention computes densely; outside torch.compile's graphs, as
    :func:`satrun.sat.sparsifier._mlp_selection`."""
    slot = self._sat  # the sparsifier's _LayerSlot
    owner = slot.owner
    if not self.training or owner.attn_rate == 0.0:
        return None
    if not in_backward() or slot.last is None:
        with torch.no_grad(), owner._clock.measure(hidden_states.device):
            q_heads, kv_heads, per_kv = _select_heads(self, hidden_states)
            kv_rows = None if kv_heads is None else _rows(kv_heads, self.head_dim)
            slot.last = (q_heads, _rows(q_heads, self.head_dim), kv_rows, per_kv)
    return slot.last


def attention_forward(
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
    internals: AttentionInternals = self._sat.internals
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
    return sparse_linear(self.o_proj, out, q_rows, 1, owner.regather), weights
