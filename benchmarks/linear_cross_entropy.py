"""Chunked LM-head cross-entropy: torch's ``F.linear_cross_entropy`` against satrun's own.

Times forward + backward of the summed next-token loss ``cross_entropy(hidden @ weight.T)`` and
counts its peak tensor memory (``satrun.perf.memory.peak_bytes``), for the SmolLM2-135M head
(hidden 576, vocab 49152) over 8 x 256 and 4 x 1024 tokens, fp32 on CPU. Variants:

- ``plain``: the unfused path, ``F.cross_entropy(F.linear(hidden, weight))`` (full logits);
- ``satrun``: ``satrun.training.loss.linear_cross_entropy`` with ``IMPLEMENTATION = "satrun"``;
- ``torch``: the same with ``IMPLEMENTATION = "torch"`` (torch's op, satrun's chunk size);
- ``torch-auto``: torch's op with its own chunking heuristic (``LinearCrossEntropyOptions()``).

Before timing, every variant's loss and gradients are compared with the plain path and torch's
with satrun's (relative error, at most 1e-5); the script exits 1 if one is off. Timings
alternate between the variants, ``--repeats`` rounds after one warm-up round; run it on an
otherwise idle machine.

    python benchmarks/linear_cross_entropy.py [--repeats 5] [--threads N] [--out result.json]
    python benchmarks/linear_cross_entropy.py --quick   # small shapes: checks that it works
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

from satrun.labels import IGNORE
from satrun.perf import memory
from satrun.training import loss as loss_module

HIDDEN, VOCAB, SHAPES = 576, 49152, [(8, 256), (4, 1024)]  # SmolLM2-135M's head; (rows, seq_len)
QUICK_HIDDEN, QUICK_VOCAB, QUICK_SHAPES, QUICK_CHUNK_ROWS = 32, 1000, [(2, 48), (1, 160)], 40
TOLERANCE = 1e-5
CPU = torch.device("cpu")

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _satrun_loss(implementation: str) -> Loss:
    def run(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        saved, loss_module.IMPLEMENTATION = loss_module.IMPLEMENTATION, implementation
        try:
            return loss_module.linear_cross_entropy(hidden, weight, targets)
        finally:
            loss_module.IMPLEMENTATION = saved
    return run


def _plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE, reduction="sum")


def _torch_auto(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.linear_cross_entropy(hidden, weight, targets, reduction="sum", ignore_index=IGNORE,
                                  options=torch.nn.LinearCrossEntropyOptions())


VARIANTS: dict[str, Loss] = {"plain": _plain, "satrun": _satrun_loss("satrun"), "torch": _satrun_loss("torch"),
                             "torch-auto": _torch_auto}


def _inputs(rows: int, seq_len: int, hidden: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states and a head of a trained model's scale; next-token targets of packed rows (the
    last position of each row has none)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows * seq_len, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * hidden**-0.5
    targets = torch.randint(0, vocab, (rows, seq_len), generator=g)
    targets[:, -1] = IGNORE
    return h.requires_grad_(), w.requires_grad_(), targets.flatten()


def _step(loss: Loss, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    h.grad = w.grad = None
    value = loss(h, w, targets)
    value.backward()
    return value.detach()


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def check(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> list[dict]:
    """Each fused variant's loss and gradients against the plain path, and torch's against satrun's."""
    results = {}
    for name, loss in VARIANTS.items():
        value = _step(loss, h, w, targets)
        results[name] = (value, h.grad.clone(), w.grad.clone())
    rows = []
    for name, reference in [("satrun", "plain"), ("torch", "plain"), ("torch-auto", "plain"), ("torch", "satrun")]:
        errors = {part: _relative(got, want) for part, got, want in
                  zip(("loss", "grad_hidden", "grad_weight"), results[name], results[reference])}
        rows.append({"variant": name, "reference": reference, **errors, "ok": max(errors.values()) <= TOLERANCE})
    return rows


def peak(loss: Loss, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> int:
    """Peak tensor bytes of one forward + backward, the inputs included (not their old gradients)."""
    h.grad = w.grad = None
    return memory.peak_bytes(lambda: _step(loss, h, w, targets), CPU, [h, w, targets])


def time_all(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds of forward + backward per variant, the variants alternating, after a warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(repeats + 1):
        for name, loss in VARIANTS.items():
            started = time.perf_counter()
            _step(loss, h, w, targets)
            if round_:
                times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small shapes, one round: checks the script works")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, vocab, shapes = (QUICK_HIDDEN, QUICK_VOCAB, QUICK_SHAPES) if args.quick else (HIDDEN, VOCAB, SHAPES)
    repeats = 1 if args.quick else args.repeats
    if args.quick:  # several chunks, the last one short, as in the full shapes
        loss_module.CHUNK_ELEMENTS = QUICK_CHUNK_ROWS * vocab

    rows, checks = [], []
    for batch, seq_len in shapes:
        h, w, targets = _inputs(batch, seq_len, hidden, vocab)
        tokens = batch * seq_len
        for row in check(h, w, targets):
            checks.append({"tokens": tokens, **row})
        peaks = {name: peak(loss, h, w, targets) for name, loss in VARIANTS.items()}
        times = time_all(h, w, targets, repeats)
        for name in VARIANTS:
            rows.append({"batch": batch, "seq_len": seq_len, "tokens": tokens, "variant": name,
                         "median_s": statistics.median(times[name]), "min_s": min(times[name]),
                         "times_s": times[name], "tokens_per_s": tokens / statistics.median(times[name]),
                         "peak_bytes": peaks[name]})

    print(f"hidden {hidden}, vocab {vocab}, fp32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"satrun chunk {loss_module.CHUNK_ELEMENTS // vocab} rows")
    print(f"{'tokens':>7} {'variant':<11} {'median s':>9} {'min s':>9} {'tokens/s':>10} {'peak MiB':>9} {'vs plain':>9}")
    for row in rows:
        plain = next(r for r in rows if r["tokens"] == row["tokens"] and r["variant"] == "plain")
        print(f"{row['tokens']:>7} {row['variant']:<11} {row['median_s']:>9.4f} {row['min_s']:>9.4f} "
              f"{row['tokens_per_s']:>10.0f} {row['peak_bytes'] / 2**20:>9.1f} {plain['median_s'] / row['median_s']:>8.2f}x")
    print("relative errors (norm-wise):")
    for c in checks:
        print(f"{c['tokens']:>7} {c['variant']:<11} vs {c['reference']:<7} loss {c['loss']:.1e}  "
              f"grad_hidden {c['grad_hidden']:.1e}  grad_weight {c['grad_weight']:.1e}  {'ok' if c['ok'] else 'OFF'}")

    result = {"hidden": hidden, "vocab": vocab, "dtype": "float32", "device": "cpu", "quick": args.quick,
              "threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__,
              "machine": platform.machine(), "processor": platform.processor(),
              "satrun_chunk_rows": loss_module.CHUNK_ELEMENTS // vocab, "default_implementation": loss_module.IMPLEMENTATION,
              "results": rows, "checks": checks}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"written to {args.out}")
    if not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
