"""One SwiGLU MLP, forward and backward: dense autograd, a masked backward (what hooks or a
detach trick give: the same result as ``omit=backward``, at the dense products' cost), and
satrun's ``exact_forward_swiglu`` at several rates, on the SmolLM2-135M MLP (hidden 576,
intermediate 1536) over a packed SFT micro-batch of 1024 rows of which 340 carry a loss.

Before timing, the masked backward's gradients are compared with satrun's (relative error at
most 1e-5); the script exits 1 if one is off. Timings alternate between the variants,
``--repeats`` rounds after two warm-up rounds; run it on an otherwise idle machine. Reported:
median milliseconds and speed-up over dense, and the FLOP model's ideal (backward products of
the sparse rows at the kept fraction).

    python benchmarks/exact_forward_mlp.py [--repeats 10] [--threads N] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from satrun.sat.importance import channel_scores
from satrun.sat.selection import kept_count, topk
from satrun.sat.sparse_ops import exact_forward_swiglu

HIDDEN, INTERMEDIATE, ROWS, LABELLED = 576, 1536, 1024, 340
RATES = (0.5, 0.9, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, HIDDEN, generator=g).requires_grad_()
    w = [(0.02 * torch.randn(*shape, generator=g)).requires_grad_()
         for shape in ((INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE))]
    perm = torch.randperm(ROWS, generator=g)
    dense_rows, sparse_rows = perm[:LABELLED].sort().values, perm[LABELLED:].sort().values
    grad_out = torch.randn(ROWS, HIDDEN, generator=g)
    chosen: dict[float, torch.Tensor] = {}

    def choose(rate: float) -> Callable:
        def pick(xs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            scores = channel_scores("contrib", xs, w[0], w[1], w[2], 1, None, hidden)
            chosen[rate] = topk(scores[None], kept_count(INTERMEDIATE, rate))[0]
            return chosen[rate]
        return pick

    def dense() -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])

    def masked(rate: float) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            hidden = F.silu(F.linear(x, w[0])) * F.linear(x, w[1])
            keep = torch.ones(ROWS, INTERMEDIATE)
            keep[sparse_rows] = 0.0
            if rate < 1.0:
                keep[sparse_rows[:, None], chosen[rate][None, :]] = 1.0
            return F.linear(hidden * keep, w[2]) + F.linear((hidden * (1 - keep)).detach(), w[2].detach())
        return run

    def exact(rate: float) -> Callable[[], torch.Tensor]:
        return lambda: exact_forward_swiglu(x, *w, dense_rows, sparse_rows, None if rate >= 1.0 else choose(rate))

    variants = {"dense": dense}
    for rate in RATES:
        variants[f"exact forward, backward rate {rate:g}"] = exact(rate)
        variants[f"masked backward, rate {rate:g}"] = masked(rate)

    def step(fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        for t in (x, *w):
            t.grad = None
        fn().backward(grad_out)
        return [t.grad.clone() for t in (x, *w)]

    for rate in RATES:  # the masked reference reads the selection the exact run made
        got, want = step(exact(rate)), step(masked(rate))
        for a, b in zip(got, want):
            err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
            if err > 1e-5:
                print(f"rate {rate}: gradients differ from the masked reference (relative error {err:.2e})")
                sys.exit(1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 2):
        for name, fn in variants.items():
            started = time.perf_counter()
            step(fn)
            if round_ >= 2:
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["dense"])
    sparse_share = (ROWS - LABELLED) / ROWS
    rows = []
    for name, samples in times.items():
        rate = next((r for r in RATES if name.endswith(f"rate {r:g}")), 0.0)
        kept = 0.0 if rate >= 1.0 else kept_count(INTERMEDIATE, rate) / INTERMEDIATE
        ideal = 1.0 if name == "dense" or name.startswith("masked") else \
            1.0 / (1 / 3 + 2 / 3 * (1 - sparse_share + sparse_share * kept))
        rows.append({"variant": name, "ms": 1000 * statistics.median(samples), "speedup": base / statistics.median(samples),
                     "ideal_speedup": ideal})
        print(f"{name:40s} {rows[-1]['ms']:8.1f} ms  {rows[-1]['speedup']:.2f}x  (ideal {ideal:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps({"machine": platform.machine(), "threads": torch.get_num_threads(),
                                        "torch": torch.__version__, "rows": ROWS, "labelled": LABELLED,
                                        "repeats": args.repeats, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
