"""`satrun plan`'s memory per rank against peaks measured on CPU at Llama-2-7B's width.

Models of Llama-2-7B's width (hidden 4096, 11008 MLP channels, 32 heads, vocabulary 32000,
untied head) but only 2 and 3 layers, with random weights, take two training steps each with
satrun's own step (``train_step``: bf16 autocast as on a GPU, fused AdamW, the labelled-only
head) under each strategy:

- ``single``: one process;
- ``ddp``: one process wrapped in DDP on a one-rank group (what each rank of a DDP run holds
  does not depend on the number of ranks);
- ``fsdp``: two FSDP2 ranks (gloo), bf16 compute through FSDP2's MixedPrecisionPolicy.

Each process reports the peak of its anonymous memory during the second step (sampled every
5 ms, RssAnon: what it allocated, libraries' pages excluded), less what it held before the
model was built. Memory is linear in the number of layers at a fixed width and batch, so two
layer counts give a line, extrapolated to Llama-2-7B's 32 layers and compared with the plan of
the same configuration (`build_plan`, as `satrun plan model=llama2-7b` computes it).

    python benchmarks/plan_memory.py --out docs/results/plan_memory/plan_memory.json
    python benchmarks/plan_memory.py --quick    # a narrow model: checks that the script works
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_memory import Phases, _status_kib, write_result  # noqa: E402  (the same sampling of peaks)

WIDTH = {"hidden_size": 4096, "intermediate_size": 11008, "num_heads": 32, "num_kv_heads": 32, "vocab_size": 32000}
QUICK = {"hidden_size": 256, "intermediate_size": 688, "num_heads": 2, "num_kv_heads": 2, "vocab_size": 32000}
STRATEGIES = {"single": 1, "ddp": 1, "fsdp": 2}


def _model_cfg(width: dict[str, int], layers: int):  # type: ignore[no-untyped-def]
    from satrun.config import ModelConfig

    return ModelConfig(name="llama2-7b-width", source="random", num_layers=layers, tie_word_embeddings=False,
                       max_position_embeddings=4096, **width)


def _worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from satrun.config import OptimConfig
    from satrun.data import collate
    from satrun.models.loading import llama_config
    from satrun.training import distributed, runtime
    from satrun.training.loss import CausalLMObjective
    from satrun.training.optim import build_optimizer
    from satrun.training.trainer import train_step

    width = QUICK if args.quick else WIDTH
    world = distributed.init_from_env()
    if args.strategy == "ddp" and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")  # torchrun's one-rank group
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    before = _status_kib("RssAnon")["RssAnon"] * 1024
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(_model_cfg(width, args.layer_count), width["vocab_size"])).train()
    if args.strategy == "fsdp":
        objective = distributed.wrap(CausalLMObjective(model), list(model.model.layers), "fsdp", world, cpu, bf16)
    elif args.strategy == "ddp":  # DDP over a one-rank group: wrap() leaves one process alone, so say two
        objective = distributed.wrap(CausalLMObjective(model), [], "ddp", distributed.World(0, 2, 0), cpu)
    else:
        objective = CausalLMObjective(model)
    optimizer = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, width["vocab_size"], (args.micro_batch, args.seq_len),
                        generator=torch.Generator().manual_seed(world.rank))
    batch = collate([(row, row.clone()) for row in ids], 0)
    amp = runtime.autocast(cpu, bf16)
    phases = Phases()
    phases.run("step 1", lambda: train_step(objective, optimizer, [batch], 1.0, amp))  # AdamW's moments appear here
    phases.run("step 2", lambda: train_step(objective, optimizer, [batch], 1.0, amp))
    print(json.dumps({"rank": world.rank, "peak_bytes": phases.anon_peaks["step 2"] - before,
                      "step_1_bytes": phases.anon_peaks["step 1"] - before, "seconds": phases.seconds}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _measure(args: argparse.Namespace, strategy: str, layers: int) -> list[dict[str, Any]]:
    script = [str(Path(__file__).resolve()), "--worker", "--strategy", strategy, "--layer-count", str(layers),
              "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch)] + (["--quick"] if args.quick else [])
    ranks = STRATEGIES[strategy]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    if strategy == "single":
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *script]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"plan_memory: {strategy} at {layers} layers failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')]
    print(f"{strategy:6} {layers} layers: peak per rank {max(r['peak_bytes'] for r in rows) / 2**30:.2f} GiB", flush=True)
    return sorted(rows, key=lambda r: r["rank"])


def _planned(width: dict[str, int], layers: int, strategy: str, ranks: int, args: argparse.Namespace) -> dict[str, float]:
    from satrun.config import SchedulerConfig
    from satrun.models.loading import llama_config
    from satrun.perf.flops import Shape
    from satrun.perf.plan import build_plan
    from satrun.sat.schedule import build_stages

    shape = Shape.from_config(llama_config(_model_cfg(width, layers), width["vocab_size"]))
    ranks = 2 if strategy == "ddp" else ranks  # a DDP rank holds the same with any number of ranks
    plan = build_plan(shape, build_stages(SchedulerConfig(name="dense"), 10), args.seq_len, args.micro_batch, "bf16",
                      ranks=ranks, strategy=strategy if strategy != "single" else "auto")
    return plan["memory_per_rank_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 3], help="the two layer counts measured")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a narrow model: checks that the script works")
    parser.add_argument("--replan", type=Path, help="take the measurements of this earlier result; plan again")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=list(STRATEGIES), help=argparse.SUPPRESS)
    parser.add_argument("--layer-count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    earlier = json.loads(args.replan.read_text()) if args.replan else None
    if earlier:
        args.layers, args.seq_len, args.micro_batch = earlier["layers_measured"], earlier["seq_len"], earlier["micro_batch_size"]
    width, target = (QUICK if args.quick else WIDTH), 32
    result: dict[str, Any] = {"width": width, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch,
                              "layers_measured": args.layers, "strategies": {}}
    print(f"{'strategy':8} {'layers':>6} {'measured GiB':>12} {'planned GiB':>12} {'plan/measured':>13}")
    for strategy, ranks in STRATEGIES.items():
        if earlier:
            measured = {n: earlier["strategies"][strategy]["per_layers"][str(n)]["measured_bytes"] for n in args.layers}
        else:
            measured = {n: max(r["peak_bytes"] for r in _measure(args, strategy, n)) for n in args.layers}
        (l0, l1), plan_ranks = args.layers, 8 if strategy == "fsdp" else 1
        slope = (measured[l1] - measured[l0]) / (l1 - l0)
        rows = {}
        for n in (*args.layers, target):
            got = measured.get(n, measured[l0] + slope * (n - l0))  # 32 layers: the line through the two
            planned = _planned(width, n, strategy, ranks, args)["peak"]
            rows[n] = {"measured_bytes": got, "planned_bytes": planned, "ratio": planned / got,
                       "extrapolated": n not in measured}
            print(f"{strategy:8} {n:6} {got / 2**30:12.2f} {planned / 2**30:12.2f} {planned / got:13.3f}"
                  + (" (measured line)" if n not in measured else ""))
        # FSDP2 at 8 ranks: the shards shrink by 2/8, the gathered layers stay; the plan's own figure
        eight = _planned(width, target, strategy, plan_ranks, args)
        result["strategies"][strategy] = {"ranks_measured": ranks, "per_layers": rows, "plan_32_layers": eight}
    if args.out:
        write_result(result, args.out)


if __name__ == "__main__":
    main()
