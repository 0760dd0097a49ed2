"""What a CPU cannot tell about satrun on a GPU, answered in one run (scripts/gpu_check.sh).

Each check is a function of its own; all write into one JSON file and print a short table:

- ``alignment``: the sparse SwiGLU (forward and backward, bf16) at Llama-2-7B's width for
  kept channel counts that are multiples of 64 and for the unaligned counts of the ladder's
  rungs, at 1k and 8k tokens, against the dense MLP;
- ``breakdown``: one layer's SAT work by CUDA events: scoring, selection, weight gathers, the
  mean fill, the sparse products (forward and backward);
- ``sync_debug``: ``torch.cuda.set_sync_debug_mode("warn")`` over one SAT training step of
  each form (``omit=forward`` at rate 0.5, ``omit=backward`` at 0.9): every host sync it reports;
- ``memory``: peak memory of one training step, dense, SAT with the mean fill and with none;
- ``checkpointing``: activation checkpointing off and on, dense and SAT: peak memory and time;
- ``determinism``: two identical SAT steps from the same state: equal loss and weights?
- ``fsdp``: one FSDP2 step at world size 1 (NCCL, bf16 MixedPrecisionPolicy), dense and SAT;
- ``bench``: ``satrun bench`` at 4 layers of 7B width, kept counts aligned (the CUDA default)
  and not.

``--smoke`` runs every check at tiny sizes on the CPU (gloo instead of NCCL, host timers where
CUDA events are missing), so the test suite keeps the script working where no GPU is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

FULL = {"hidden": 4096, "intermediate": 11008, "heads": 32, "vocab": 32000, "layers": 2, "tokens": [1024, 8192],
        "kept": {"aligned": [6592, 7680, 8832], "unaligned": [6605, 7706, 8806]}, "repeats": 10}
SMOKE = {"hidden": 64, "intermediate": 172, "heads": 4, "vocab": 256, "layers": 2, "tokens": [16, 64],
         "kept": {"aligned": [64, 128], "unaligned": [103, 120]}, "repeats": 2}


class Timer:
    """Seconds of device work between two points: CUDA events on a GPU, host time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, into: list[float]):  # type: ignore[no-untyped-def]
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            into.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            yield
            into.append(time.perf_counter() - started)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _timed(work: Callable[[], Any], timer: Timer, repeats: int) -> float:
    work()  # warm-up
    times: list[float] = []
    for _ in range(repeats):
        with timer(times):
            work()
    return _median(times)


def check_alignment(size: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from satrun.sat.sparse_ops import sparse_swiglu

    h, i, timer = size["hidden"], size["intermediate"], Timer(device)
    weights = [torch.randn(i, h, device=device, requires_grad=True), torch.randn(i, h, device=device, requires_grad=True),
               torch.randn(h, i, device=device, requires_grad=True)]
    rows = []
    for tokens in size["tokens"]:
        x = torch.randn(tokens, h, device=device, dtype=dtype, requires_grad=True)

        def dense() -> None:
            with torch.autocast(device.type, dtype=dtype):
                out = torch.nn.functional.linear(torch.nn.functional.silu(x @ weights[0].t()) * (x @ weights[1].t()),
                                                 weights[2])
            out.sum().backward()

        dense_s = _timed(dense, timer, size["repeats"])
        for kind, counts in size["kept"].items():
            for k in counts:
                idx = torch.arange(k, device=device) * (i // k)  # spread over the channels, sorted
                idx = idx[idx < i][:k]

                def sparse() -> None:
                    with torch.autocast(device.type, dtype=dtype):
                        out = sparse_swiglu(x, *weights, idx)
                    out.sum().backward()

                seconds = _timed(sparse, timer, size["repeats"])
                rows.append({"tokens": tokens, "kept": k, "kind": kind, "seconds": seconds, "dense_seconds": dense_s,
                             "speedup": dense_s / seconds, "ideal": i / k})
    return {"rows": rows}


def _model(size: dict, device: torch.device, layers: int | None = None):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                         num_hidden_layers=layers or size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["heads"], tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device).train()


def _batch(size: dict, device: torch.device, tokens: int) -> dict:
    from satrun.data import collate

    ids = torch.randint(0, size["vocab"], (1, tokens), generator=torch.Generator().manual_seed(0))
    return {k: v.to(device) for k, v in collate([(ids[0], ids[0].clone())], 0).items()}


def _sat(model: Any, fill: str = "mean", rate: float = 0.5, attn: float = 0.0, omit: str = "forward"):  # type: ignore[no-untyped-def]
    from satrun.sat.settings import MetricConfig, SelectorConfig
    from satrun.sat.sparsifier import Sparsifier

    sat = Sparsifier(model, MetricConfig(), SelectorConfig(fill=fill), seed=0, omit=omit)
    sat.set_rates(rate, attn, step=0)
    return sat


def _step(model: Any, batch: dict, dtype: torch.dtype, device: torch.device) -> Any:
    from satrun.config import OptimConfig
    from satrun.training import runtime
    from satrun.training.loss import CausalLMObjective
    from satrun.training.optim import build_optimizer
    from satrun.training.trainer import train_step

    optimizer = build_optimizer(model, OptimConfig())
    return lambda: train_step(CausalLMObjective(model), optimizer, [batch], 1.0, runtime.autocast(device, dtype))


def check_breakdown(size: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from satrun.sat import importance, selection
    from satrun.sat.sparse_ops import sparse_swiglu
    from satrun.sat.sparsifier import _omitted_mean_output

    h, i, timer, reps = size["hidden"], size["intermediate"], Timer(device), size["repeats"]
    tokens = size["tokens"][-1]
    mlp = _model(size, device, layers=1).model.layers[0].mlp
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    x = torch.randn(tokens, h, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    k = selection.kept_count(i, 0.5, 64 if device.type == "cuda" else 1)
    with torch.no_grad():
        act = importance.activations(x.float(), wg, wu, 8)
        scores = importance.channel_scores("contrib", x.float(), wg, wu, wd, 8, gen, act)
        kept = selection.sample(scores[None], k, 0.05, gen, "rank")[0]
    xg = x.detach().requires_grad_(True)
    parts = {
        "scoring": lambda: importance.channel_scores("contrib", x.float(), wg, wu, wd, 8, gen,
                                                     importance.activations(x.float(), wg, wu, 8)),
        "selection": lambda: selection.sample(scores[None], k, 0.05, gen, "rank"),
        "gathers": lambda: (wg.index_select(0, kept).to(dtype), wu.index_select(0, kept).to(dtype),
                            wd.index_select(1, kept).to(dtype)),
        "fill": lambda: _omitted_mean_output(act.mean(0), wd, kept),
        "sparse_forward": lambda: sparse_swiglu(xg, wg, wu, wd, kept),
        "sparse_forward_backward": lambda: sparse_swiglu(xg, wg, wu, wd, kept).sum().backward(),
    }
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = {name: _timed(work, timer, reps) for name, work in parts.items()}
    return {"tokens": tokens, "kept": k, "seconds": out}


def check_sync_debug(size: dict, device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":
        return {"skipped": "torch.cuda.set_sync_debug_mode needs CUDA"}
    found = {}
    for omit, rate in (("forward", 0.5), ("backward", 0.9)):  # the sub-network, and the exact-forward form
        model = _model(size, device)
        _sat(model, rate=rate, omit=omit)
        step = _step(model, _batch(size, device, size["tokens"][0]), dtype, device)
        step()  # warm-up: lazy initialisations sync once
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        found[omit] = {"syncs": len(syncs), "messages": syncs[:10]}
    return found


def _peak(work: Callable[[], Any], model: Any, device: torch.device) -> int:
    from satrun.perf.memory import peak_bytes

    return peak_bytes(work, device, [*model.parameters(), *model.buffers()])


def check_memory(size: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for name, fill in (("dense", None), ("sat_mean_fill", "mean"), ("sat_zero_fill", "zero")):
        model = _model(size, device)
        if fill:
            _sat(model, fill)
        step = _step(model, _batch(size, device, size["tokens"][-1]), dtype, device)
        step()  # AdamW's state exists from here on
        out[name] = _peak(step, model, device)
    return {"peak_bytes": out}


def check_checkpointing(size: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from satrun.training.runtime import enable_activation_checkpointing

    rows = []
    for sat in (False, True):
        for checkpointing in (False, True):
            model = _model(size, device)
            if checkpointing:
                enable_activation_checkpointing(model)
            if sat:
                _sat(model)
            step = _step(model, _batch(size, device, size["tokens"][-1]), dtype, device)
            seconds = _timed(step, Timer(device), max(1, size["repeats"] // 2))
            rows.append({"sat": sat, "checkpointing": checkpointing, "seconds": seconds, "peak_bytes": _peak(step, model, device)})
    return {"rows": rows}


def check_determinism(size: dict, device: torch.device, dtype: torch.dtype) -> dict:
    results = []
    for _ in range(2):
        model = _model(size, device)
        _sat(model)
        loss, grad_norm, _, _ = _step(model, _batch(size, device, size["tokens"][-1]), dtype, device)()
        results.append((float(loss), float(grad_norm), [p.detach().clone() for p in model.parameters()]))
    (l0, g0, p0), (l1, g1, p1) = results
    diff = max(float((a - b).abs().max()) for a, b in zip(p0, p1))
    return {"loss": [l0, l1], "grad_norm": [g0, g1], "bitwise_equal": l0 == l1 and diff == 0.0, "max_weight_diff": diff}


def check_fsdp(size: dict, device: torch.device, dtype: torch.dtype) -> dict:
    import torch.distributed as dist

    from satrun.config import OptimConfig
    from satrun.training import distributed, runtime
    from satrun.training.loss import CausalLMObjective
    from satrun.training.optim import build_optimizer
    from satrun.training.trainer import train_step

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    out = {"backend": dist.get_backend()}
    try:
        for name, sat in (("dense", False), ("sat", True)):
            model = _model(size, device)
            if sat:
                _sat(model).regather = True  # as under FSDP2 in training
            objective = distributed.wrap(CausalLMObjective(model), list(model.model.layers), "fsdp",
                                         distributed.World(0, 2, 0), device, dtype)  # two: wrap() leaves one rank alone
            optimizer = build_optimizer(model, OptimConfig())
            loss, *_ = train_step(objective, optimizer, [_batch(size, device, size["tokens"][0])], 1.0,
                                  runtime.autocast(device, dtype))
            out[name] = {"loss": float(loss), "sharded": distributed.is_sharded(model), "fused_adamw": bool(optimizer.defaults["fused"])}
    finally:
        dist.destroy_process_group()
    return out


def check_bench(size: dict, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool) -> dict:
    rows = {}
    for name, align, compiled, extra in (("aligned", "null", False, []), ("unaligned", "1", False, []),
                                         ("aligned, compiled", "null", True, []),
                                         # dense LoRA against SAT-LoRA, and where each step's time goes
                                         ("lora", "null", False, ["adapter=lora", "bench.profile=true"])):
        folder = out_dir / f"bench-{name.replace(', ', '-')}"
        sizes = ([f"model.hidden_size={size['hidden']}", f"model.intermediate_size={size['intermediate']}",
                  f"model.num_heads={size['heads']}", f"model.num_kv_heads={size['heads']}", "model.num_layers=2"]
                 if smoke else ["model=llama2-7b", "model.num_layers=4", "model.vocab_size=null"])
        command = ["bench", *sizes, "model.source=random", f"trainer.device={device.type}",
                   f"trainer.precision={'bf16' if dtype == torch.bfloat16 else 'fp32'}",
                   f"trainer.seq_len={64 if smoke else 2048}", f"trainer.micro_batch_size={1 if smoke else 4}",
                   "~calibration", "bench.rates=[0.5]", f"bench.steps={1 if smoke else 3}", f"bench.repeats={1 if smoke else 2}",
                   f"selector.align={align}", f"trainer.compile={compiled}", *extra, f"hydra.run.dir={folder}"]
        code, said = _satrun(command)  # in this process: no interpreter start-up and imports per row
        if code != 0:
            rows[name] = {"error": said.strip().splitlines()[-1:] or ["failed"]}
            continue
        bench = json.loads((folder / "bench.json").read_text())
        rows[name] = [{k: r.get(k) for k in ("name", "speedup", "ideal_speedup", "efficiency", "mfu", "profile_s")} for r in bench]
    return rows


def _satrun(args: list[str]) -> tuple[int, str]:
    """``satrun <args>`` through its main() in this process: the exit status and what it wrote to stderr."""
    import io

    from satrun.cli.main import main as satrun_main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = satrun_main(args)
        except Exception as exc:  # a bug: its one line in the row
            err.write(f"{type(exc).__name__}: {exc}\n")
            code = 1
    return code, err.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks that the script works")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default: outputs/gpu-check/<time>)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: error: torch sees no CUDA device (use --smoke to run on the CPU)")
    dtype = torch.bfloat16
    size = SMOKE if args.smoke else FULL
    out_dir = args.out or Path("outputs") / "gpu-check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "smoke": args.smoke, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "sizes": size, "checks": {},
    }
    checks: dict[str, Callable[[], dict]] = {
        "alignment": lambda: check_alignment(size, device, dtype),
        "breakdown": lambda: check_breakdown(size, device, dtype),
        "sync_debug": lambda: check_sync_debug(size, device, dtype),
        "memory": lambda: check_memory(size, device, dtype),
        "checkpointing": lambda: check_checkpointing(size, device, dtype),
        "determinism": lambda: check_determinism(size, device, dtype),
        "fsdp": lambda: check_fsdp(size, device, dtype),
        "bench": lambda: check_bench(size, device, dtype, out_dir, args.smoke),
    }
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        try:
            result["checks"][name] = check()
        except Exception as exc:  # one failed check must not lose the others' answers
            result["checks"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        result["checks"][name]["wall_s"] = time.perf_counter() - started
        print(f"{name:14} {result['checks'][name]['wall_s']:7.1f} s  {_summary(name, result['checks'][name])}", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out_dir / 'gpu_check.json'}")


def _summary(name: str, check: dict) -> str:
    """One line per check for the table."""
    if "error" in check:
        return f"ERROR {check['error']}"
    if "skipped" in check:
        return f"skipped: {check['skipped']}"
    if name == "alignment":
        return "; ".join(f"{r['tokens']} tok {r['kind']} {r['kept']}: {r['speedup']:.2f}x (ideal {r['ideal']:.2f})"
                         for r in check["rows"])
    if name == "breakdown":
        return ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in check["seconds"].items())
    if name == "sync_debug":
        return ", ".join(f"omit={omit}: {c['syncs']} host syncs in one SAT step" for omit, c in check.items())
    if name == "memory":
        return ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in check["peak_bytes"].items())
    if name == "checkpointing":
        return "; ".join(f"{'SAT' if r['sat'] else 'dense'}{' +ckpt' if r['checkpointing'] else ''}: "
                         f"{r['seconds']:.3f} s, {r['peak_bytes'] / 2**30:.2f} GiB" for r in check["rows"])
    if name == "determinism":
        return f"bitwise equal: {check['bitwise_equal']} (max weight diff {check['max_weight_diff']:.2e})"
    if name == "fsdp":
        return f"{check['backend']}: " + ", ".join(f"{k} loss {v['loss']:.4f}" for k, v in check.items()
                                                   if isinstance(v, dict))
    if name == "bench":
        return "; ".join(f"{k}: " + (", ".join(f"{r['name']} {r['speedup']:.2f}x" for r in v if r.get("speedup"))
                                     if isinstance(v, list) else str(v)) for k, v in check.items() if k != "wall_s")
    return ""


if __name__ == "__main__":
    main()
