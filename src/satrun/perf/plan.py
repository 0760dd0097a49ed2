"""What a configuration will cost, from the model's shape alone: FLOPs, ideal SAT speed-up, memory.

No weights are loaded. The shape comes from the model folder's config.json when ``model.path``
points at one, else from the sizes in the model's config (every shipped model config lists them).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from satrun.errors import UsageError
from satrun.perf.flops import Shape, step_flops, token_flops
from satrun.sat.schedule import Stage

BYTES = {"fp32": 4, "bf16": 2}


def shape_of(model_cfg: Any) -> Shape:
    """The decoder's shape: config.json in ``model.path`` if it is a local folder, else the config's sizes."""
    path = Path(model_cfg.path).expanduser() if model_cfg.path else None
    if path is not None and (path / "config.json").is_file():
        from transformers import AutoConfig

        return Shape.from_config(AutoConfig.from_pretrained(path))
    if not model_cfg.vocab_size:
        raise UsageError(f"model={model_cfg.name}: its sizes are unknown; set model.vocab_size (and the other sizes)")
    from satrun.models.loading import llama_config

    return Shape.from_config(llama_config(model_cfg, model_cfg.vocab_size))


def parameters(shape: Shape) -> int:
    """Trainable parameters; a tied LM head is the input embedding, counted once."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    return shape.layers * layer_parameters(shape) + embeddings + shape.hidden


def activation_bytes(shape: Shape, tokens: int, act_bytes: int, mlp_keep: float = 1.0, head_keep: float = 1.0,
                     checkpointing: bool = False) -> float:
    """Activations kept for backward in one micro-batch of ``tokens`` positions (an estimate).

    Per token and layer, as transformers' Llama layer keeps them (measured with satrun's tensor
    counter at two widths; benchmarks/plan_memory.py checks the whole): the two RMSNorms' fp32
    inputs and outputs (16h bytes, fp32 even under autocast); the attention's tensors of width
    h (q, k, v and their rotary forms, the kernel's output and inputs: six fp32 ones, nine bf16
    ones under autocast, which casts the projections' shared input once per projection); the
    MLP's gate, up, SiLU and product (4i). Plus the head's logits and their gradient (fp32) at
    every position, the most a step can have (satrun's head runs at labelled positions only).
    With activation ``checkpointing`` each layer keeps only its fp32 input, and one layer's
    activations exist at a time (recomputed in backward).
    """
    h = shape.hidden
    attention = (6 * 4 if act_bytes == 4 else 9 * 2) * h * (head_keep if shape.heads == shape.kv_heads else 1.0)
    per_layer = 16 * h + attention + 4 * shape.intermediate * act_bytes * mlp_keep
    layers = shape.layers * 4 * h + per_layer if checkpointing else shape.layers * per_layer
    return tokens * (layers + 2 * 4 * shape.vocab)


def linear_parameters(shape: Shape) -> int:
    """Parameters that go through matrix products: each layer's projections and the LM head
    (autocast keeps a bf16 copy of each for backward)."""
    return shape.layers * (layer_parameters(shape) - 2 * shape.hidden) + shape.vocab * shape.hidden


def adapter_parameters(shape: Shape) -> int:
    """LoRA parameters (``shape.lora_rank`` on every projection): r (in + out) each."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return shape.layers * shape.lora_rank * (2 * (h + q) + 2 * (h + kv) + 3 * (h + i))


def layer_parameters(shape: Shape) -> int:
    """Parameters of one decoder layer."""
    h, d = shape.hidden, shape.head_dim
    return h * shape.heads * d * 2 + h * shape.kv_heads * d * 2 + 3 * h * shape.intermediate + 2 * h


def memory_per_rank(shape: Shape, ranks: int, strategy: str, compute_bytes: int, tokens: int = 0,
                    mlp_keep: float = 1.0, head_keep: float = 1.0, checkpointing: bool = False) -> dict[str, float]:
    """Bytes each rank holds, and its peak during a step of micro-batches of ``tokens`` positions.

    Always: fp32 weights, gradients and AdamW's two moments (under FSDP2 this rank's shards);
    with LoRA (``shape.lora_rank``) gradients and moments of the adapters only.
    One process and DDP under bf16: autocast's bf16 copy of every matrix, kept for backward
    (``autocast_copies``). DDP's gradients are views of its communication buckets, which it
    allocates once and keeps: the gradients' memory never goes away between steps. FSDP2:
    what it gathers for a moment, in the compute dtype (``gathered``): the root group
    (embeddings, final norm, head) for the whole step, two decoder layers (the one computing and
    the next, prefetched), and one layer's whole gradient in the compute dtype and in fp32 for
    the reduce-scatter; its parameters are already bf16, so autocast copies nothing.

    ``peak``: all of it summed, as if no memory freed in backward served a later tensor: the
    activations and copies go as the gradients come, so the tensors alive at once are fewer
    (by at most the smaller of the two), but an allocator only hands freed blocks on where
    sizes fit, and on CPU, measured, the peaks come within 10% of this sum at Llama-2-7B's
    width (benchmarks/plan_memory.py, docs/performance.md); under DDP the gradients' buckets
    are there throughout anyway.
    ``host_start_up``: host memory of the weights while the model is built (FSDP2 starts from
    the meta device and reads only its shards; otherwise each rank loads the whole model)."""
    n = parameters(shape)
    trained = adapter_parameters(shape) if shape.lora_rank else n  # LoRA: the frozen base has no gradient, no moments
    n += adapter_parameters(shape)
    shards = ranks if strategy == "fsdp" and ranks > 1 else 1
    layer = layer_parameters(shape)
    root = n - shape.layers * layer
    sharded = shards > 1
    gathered = (root + 2 * layer) * compute_bytes + layer * (compute_bytes + 4) if sharded else 0.0
    # autocast's cache keeps every copy to the end of the forward, checkpointed layers' too
    copies = 2 * linear_parameters(shape) if compute_bytes == 2 and not sharded else 0.0
    acts = activation_bytes(shape, tokens, compute_bytes, mlp_keep, head_keep, checkpointing)
    own = {"weights": 4 * n / shards, "gradients": 4 * trained / shards, "optimizer": 8 * trained / shards,
           "gathered": gathered}
    peak = sum(own.values()) + copies + acts
    return {**own, "model_total": sum(own.values()), "autocast_copies": copies, "activations": acts, "peak": peak,
            "host_start_up": 4 * n / shards}


# A GPU step's work that scales with the weights, not the tokens: fused AdamW reads and writes
# the fp32 weight and both moments and reads the gradient (28 bytes per parameter), clipping
# reads the gradient, zeroing writes it, autocast reads the weight and writes its bf16 copy
# (about 42 bytes in all), at memory speed. The matrix products take 6 FLOPs per parameter and
# token at a fraction of the peak. An H100 SXM: 3.35 TB/s, 989 TFLOP/s bf16 (half of it reached).
# A frozen weight (LoRA's base) has no optimizer, gradient or clipping: autocast's copy alone
# (6 bytes), and its products take 4 FLOPs per parameter and token (no weight gradient).
PER_WEIGHT_BYTES, FROZEN_WEIGHT_BYTES, GPU_BYTES_PER_S, GPU_FLOPS = 42, 6, 3.35e12, 0.5 * 989e12


def per_weight_share(parameters: int, tokens: int, frozen: bool = False) -> float:
    """The estimated share of a GPU step of ``tokens`` positions spent on per-weight work, which
    SAT does not shrink (a prediction from the constants above, not a measurement); ``frozen``:
    the weights are a LoRA run's frozen base."""
    weights = parameters * (FROZEN_WEIGHT_BYTES if frozen else PER_WEIGHT_BYTES) / GPU_BYTES_PER_S
    return weights / (weights + (4 if frozen else 6) * parameters * tokens / GPU_FLOPS)


def build_plan(
    shape: Shape, stages: list[Stage], seq_len: int, micro_batch: int, precision: str, align: int = 1,
    layers: Optional[Sequence[int]] = None, ranks: int = 1, strategy: str = "auto",
    split: Optional[Sequence[float]] = None, sparse_tokens: str = "all", grad_accum: int = 1,
    checkpointing: bool = False, omit: str = "forward",
) -> dict[str, Any]:
    """Dense and per-stage FLOPs per token, ideal speed-ups, and a memory estimate per rank.
    ``align`` and ``layers`` are the selector's rounding and the sparsified layers, as in
    training; ``ranks`` and ``strategy`` the data parallelism (fsdp shards the model state).

    ``split`` gives the shares of a step's positions that are labelled, unlabelled and padding
    (SFT: measured on the data); stages then cost what ``step_flops`` says (the LM head at
    labelled positions only, ``sparse_tokens`` choosing the sparse ones), and the run's training FLOPs
    are estimated, dense and SAT. Without it every position is a labelled token (CPT)."""
    dense = token_flops(shape, seq_len)
    positions = seq_len * micro_batch * grad_accum * ranks  # per optimizer step, all ranks

    def per_position(mlp_rates: Any, attn_rates: Any) -> float:
        counts = (1, 0, 0) if split is None else split  # CPT: every position a labelled token
        return step_flops(shape, seq_len, counts, mlp_rates, attn_rates, align, tokens=sparse_tokens, omit=omit)

    dense_cost = per_position(0.0, 0.0)
    rows = []
    for stage in stages:
        mlp_rates, attn_rates = stage.per_layer(shape.layers, layers)
        flops = token_flops(shape, seq_len, mlp_rates, attn_rates, align)
        cost = per_position(mlp_rates, attn_rates)
        rows.append({
            "name": stage.name, "steps": stage.steps, "mlp_rate": stage.mlp_rate, "attn_rate": stage.attn_rate,
            "mlp_layer_rates": mlp_rates, "flops_per_token": flops.as_dict(), "train_flops_per_position": cost,
            "ideal_speedup": dense_cost / cost,
        })
    total_steps = sum(r["steps"] for r in rows)
    sat_time = sum(r["steps"] / r["ideal_speedup"] for r in rows)  # in units of one dense step
    n_params = parameters(shape)
    act = BYTES.get(precision, 4)
    tokens = seq_len * micro_batch
    return {
        "shape": asdict(shape),
        "parameters": n_params,
        "adapter_parameters": adapter_parameters(shape),
        "per_weight_share": per_weight_share(n_params, tokens, frozen=shape.lora_rank > 0),
        "seq_len": seq_len,
        "micro_batch_size": micro_batch,
        "precision": precision,
        "dense_flops_per_token": dense.as_dict(),
        "stages": rows,
        "run_ideal_speedup": total_steps / sat_time if sat_time else 1.0,
        "run_flop_fraction": sat_time / total_steps if total_steps else 1.0,  # SAT's training FLOPs over dense's
        "token_split": None if split is None else dict(zip(("labelled", "unlabelled", "padding"), split)),
        "sparse_tokens": sparse_tokens,
        "omit": omit,
        "train_flops": {"dense": total_steps * positions * dense_cost, "sat": sat_time * positions * dense_cost},
        "ranks": ranks,
        "strategy": strategy,
        "activation_checkpointing": checkpointing,
        "memory_per_rank_bytes": memory_per_rank(shape, ranks, strategy, act, tokens, checkpointing=checkpointing),
        "memory_per_rank_first_stage_bytes": memory_per_rank(shape, ranks, strategy, act, tokens,
                                                             # omit=backward keeps the forward's activations (fewer for backward: not modelled)
                                                             1 - stages[0].mlp_rate if omit == "forward" else 1.0,
                                                             1 - stages[0].attn_rate, checkpointing),
    }


def write_plan(plan: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")


def print_plan(plan: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    gib = 2**30
    console = Console()
    dense = plan["dense_flops_per_token"]
    parts = Table(title=f"FLOPs per token (seq {plan['seq_len']}, {plan['parameters'] / 1e6:.1f}M parameters)")
    for column in ("part", "forward", "share"):
        parts.add_column(column, justify="left" if column == "part" else "right")
    for part in ("attn_proj", "attn_core", "mlp", "lm_head"):
        parts.add_row(part, f"{dense[part] / 1e9:.3f} G", f"{100 * dense[part] / dense['forward']:.1f}%")
    parts.add_row("forward", f"{dense['forward'] / 1e9:.3f} G", "")
    parts.add_row("backward", f"{dense['backward'] / 1e9:.3f} G", "")
    parts.add_row("train step", f"{dense['train'] / 1e9:.3f} G", "")
    console.print(parts)
    stages = Table(title=f"SAT stages (whole-run ideal speed-up {plan['run_ideal_speedup']:.2f}x, "
                         f"{100 * plan['run_flop_fraction']:.1f}% of dense training FLOPs)")
    for column in ("stage", "steps", "mlp/attn rate", "train GFLOPs/position", "ideal speed-up"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for row in plan["stages"]:
        stages.add_row(
            row["name"], str(row["steps"]), f"{row['mlp_rate']:.2f}/{row['attn_rate']:.2f}",
            f"{row['train_flops_per_position'] / 1e9:.3f}", f"{row['ideal_speedup']:.2f}x",
        )
    console.print(stages)
    split, flops = plan["token_split"], plan["train_flops"]
    if split is not None:
        console.print(f"token split (measured on the data): {100 * split['labelled']:.1f}% labelled, "
                      f"{100 * split['unlabelled']:.1f}% unlabelled, {100 * split['padding']:.1f}% padding; "
                      f"neurons omitted for {plan['sparse_tokens']} tokens; the LM head runs at labelled positions")
    if plan["omit"] == "backward":
        console.print("scheduler.omit=backward: every forward dense; the sparse tokens' MLP backward on the kept channels")
    console.print(f"training FLOPs of the run: dense {flops['dense']:.3e}, SAT {flops['sat']:.3e}")
    per_rank, first = plan["memory_per_rank_bytes"], plan["memory_per_rank_first_stage_bytes"]
    ranks = Table(title=f"memory per rank: {plan['ranks']} rank(s), strategy {plan['strategy']} (plan.ranks, trainer.strategy)")
    ranks.add_column("what")
    ranks.add_column("GiB", justify="right")
    for key in ("weights", "gradients", "optimizer", "gathered", "autocast_copies", "activations", "host_start_up"):
        ranks.add_row(key.replace("_", " "), f"{per_rank[key] / gib:.2f}")
    ranks.add_row("peak during a step (dense; first SAT stage)", f"{per_rank['peak'] / gib:.2f}; {first['peak'] / gib:.2f}")
    console.print(ranks)
    if plan["adapter_parameters"]:
        console.print(f"LoRA rank {plan['shape']['lora_rank']}: {plan['adapter_parameters'] / 1e6:.1f}M adapter parameters "
                      "train (gradients and AdamW state for them only); the base is frozen, its products have no "
                      "weight gradient")
    share = plan["per_weight_share"]
    if share > 0.2 and plan["parameters"] >= 1e9:  # a model trained on GPUs
        tokens = plan["seq_len"] * plan["micro_batch_size"]
        console.print(f"warning: at {tokens} tokens per micro-batch, work per weight ("
                      f"{'casts' if plan['adapter_parameters'] else 'AdamW, clipping, casts'}) is about "
                      f"{100 * share:.0f}% of a GPU step (an estimate for an H100): SAT shrinks only the rest. On a GPU "
                      "give each micro-batch several thousand tokens (trainer.seq_len x trainer.micro_batch_size)")
