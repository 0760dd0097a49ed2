"""Next-token cross-entropy, computed without materialising the logits of the whole batch.

The LM head of a small model over a large vocabulary is where a training step spends much of
its memory and time outside the decoder: ``[tokens, vocab]`` logits, their log-softmax, the
zero-filled gradient buffer and the log-softmax backward each touch the whole tensor. The
fused path walks the tokens in chunks: per chunk it computes the logits, the loss, and at
once (the loss being the graph's end, its gradient is known in the forward) the gradients for
the hidden states and the head's weight; backward then only scales them. Same FLOPs as the
plain path, a fraction of its memory traffic.

Two implementations of that path, chosen by ``IMPLEMENTATION``:

- ``"torch"``: ``torch.nn.functional.linear_cross_entropy`` with chunking options (torch >= 2.13),
  for fp32 (and fp64) computation. Under a 16-bit autocast (or with 16-bit weights) it is not
  used: torch's chunked op returns the summed loss in the 16-bit input dtype and adds the
  chunks' head-weight gradients in that dtype, where satrun's keeps both in fp32 (measured: the
  loss of 300 tokens 0.37% off, evaluation perplexity included). Passing it fp32
  inputs instead would run the head's matmuls in fp32 on CUDA. So 16-bit computation always
  takes satrun's own path below.
- ``"satrun"``: satrun's own (``_LinearCrossEntropy``), for every dtype.

Both cut the tokens into chunks of ``CHUNK_ELEMENTS // vocab`` rows and give the same loss and
gradients as the dense logits path (tests/training/test_loss.py);
benchmarks/linear_cross_entropy.py times them.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from satrun.data.batches import loss_rows
from satrun.labels import IGNORE

IMPLEMENTATION = "torch"  # "torch" | "satrun": who computes fp32 chunked cross-entropy (see above)
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB in fp32; fewer chunks, fewer passes over grad_w)
FUSABLE = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


class CausalLMObjective(torch.nn.Module):
    """A causal LM and its loss as one module: what the loop calls, and what DDP or FSDP wrap,
    so that their forward hooks see the whole loss computation. Each of ``batch_hooks`` is
    called with the micro-batch before its forward (e.g. to tell a sparsifier which tokens
    carry a loss)."""

    def __init__(self, model: torch.nn.Module, batch_hooks: Sequence[Callable[[dict], None]] = ()) -> None:
        super().__init__()
        self.model = model
        self.batch_hooks = list(batch_hooks)

    def forward(self, batch: dict[str, torch.Tensor], normalizer: float) -> torch.Tensor:
        for hook in self.batch_hooks:
            hook(batch)
        return causal_lm_loss(self.model, batch, normalizer)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], normalizer: float,
                   every_position: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled tokens, divided by ``normalizer``.

    Dividing every micro-batch by the step's total label count makes gradient accumulation
    weigh each token equally, however the tokens fall into micro-batches. The LM head runs only
    at the positions whose target carries a label (``loss_rows``: their hidden states are
    gathered first), which in SFT are a fraction of the tokens; the loss and every gradient are
    those of the head at all positions. ``every_position`` computes the head everywhere and
    masks afterwards (the way before; ``satrun bench`` times it).
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:].flatten()  # shift labels, not logits: no copy
    rows = None if every_position else loss_rows(batch)
    head = _plain_head(model)
    if head is None:
        logits = model(**inputs, use_cache=False).logits.flatten(0, 1)
        if rows is not None:  # the head's own forward ran everywhere: only the loss shrinks
            logits, targets = logits.index_select(0, rows), targets.index_select(0, rows)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    else:
        hidden = model.model(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        if rows is not None:
            hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
        loss = linear_cross_entropy(hidden, head, targets)
    return loss / normalizer


def _plain_head(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """The LM head's weight when logits are exactly ``hidden @ weight.T`` (no bias, no scaling)."""
    if type(model).__name__ not in FUSABLE:
        return None
    head = model.lm_head
    if getattr(head, "bias", None) is not None or getattr(model.config, "final_logit_softcapping", None):
        return None
    return head.weight


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over tokens of cross_entropy(hidden @ weight.T, targets), IGNORE targets left out, summed in fp32 (or wider).

    Without autograd (evaluation under ``torch.no_grad``) only the loss is computed.
    """
    if IMPLEMENTATION not in ("torch", "satrun"):
        raise ValueError(f"satrun.training.loss.IMPLEMENTATION={IMPLEMENTATION!r} is not 'torch' or 'satrun'")
    if IMPLEMENTATION == "torch" and _full_precision(hidden, weight):
        return F.linear_cross_entropy(hidden, weight, targets, reduction="sum", ignore_index=IGNORE,
                                      options=torch_options(weight.shape[0]))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    return _chunked(hidden, weight, targets, want_h=False, want_w=False)[0]


def torch_options(vocab: int) -> torch.nn.LinearCrossEntropyOptions:
    """torch's chunking with satrun's chunk size; "compact" adds each chunk's weight gradient
    straight into the gradient (no second ``[vocab, hidden]`` buffer), as satrun's path does."""
    return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=max(1, CHUNK_ELEMENTS // vocab),
                                              chunking_method=None, acc_policy="compact")


def _full_precision(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the head's matmuls run in the inputs' own 32- or 64-bit dtype (no 16-bit autocast)."""
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    return hidden.dtype == weight.dtype == dtype and dtype.itemsize >= 4


def _chunked(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, want_h: bool, want_w: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(summed loss, d loss / d hidden, d loss / d weight), the gradients only where wanted."""
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    h, w = hidden.to(dtype), weight.to(dtype)
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = max(1, CHUNK_ELEMENTS // w.shape[0])
    with torch.autocast(kind, enabled=False):
        for start in range(0, h.shape[0], rows):
            h_c, t_c = h[start : start + rows], targets[start : start + rows]
            logits = (h_c @ w.t()).float()
            valid = t_c != IGNORE
            picked = t_c.clamp_min(0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, picked[:, None])[:, 0]) * valid).sum()
            if not (want_h or want_w):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(grad.shape[0], device=grad.device), picked] -= 1.0
            grad = grad.mul_(valid[:, None]).to(dtype)
            if grad_h is not None:
                torch.mm(grad, w, out=grad_h[start : start + rows])
            if grad_w is not None and grad_w.dtype == grad.dtype:
                grad_w.addmm_(grad.t(), h_c)  # in place: one pass over the [vocab, hidden] buffer per chunk
            elif grad_w is not None:
                grad_w += grad.t() @ h_c  # low-precision products, accumulated in fp32
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):  # type: ignore[no-untyped-def]
        total, grad_h, grad_w = _chunked(hidden, weight, targets, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    @once_differentiable  # the gradients were computed in forward; there is no graph through them
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        grad_h, grad_w = ctx.saved_tensors  # used once: scaled in place, no second full-size buffer
        h_dtype, w_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h.mul_(grad_out).to(h_dtype),
            None if grad_w is None else grad_w.mul_(grad_out).to(w_dtype),
            None,
        )
