"""Peak host memory per rank: 2-rank FSDP2 (gloo, CPU) against one process, phase by phase.

A Llama-shaped model of about 1B parameters (random weights, saved once as a bf16 Hugging Face
safetensors folder, as pre-trained Llama checkpoints are published; training is in fp32) goes through what ``satrun train`` does
with it, using satrun's own functions:

- ``start-up``: build the model and give it its weights. One process: ``from_pretrained``.
  FSDP2: every rank builds it on the meta device, shards it, and reads only its own rows.
- ``step``: one optimizer step (AdamW), a micro-batch of ``--seq-len`` tokens.
- ``save``: a checkpoint (one process: model folder + optimizer state; FSDP2: each rank its shards).
- ``final``: the final Hugging Face folder (FSDP2: shards joined one tensor at a time).
- ``resume``: new processes build the model again and restore the checkpoint into it.

Each phase reports two peaks per process (see ``Phases``): the resident-set high-water mark,
file pages it maps included (safetensors are read through a memory map), and the peak of its
anonymous memory. glibc's allocator is left as it is; ``--tuned`` makes it keep freed memory
as satrun does in one-process CPU runs (satrun leaves it alone for several ranks: there the
retained memory of each thread's arena grows a CPU FSDP2 rank by half again).

    python benchmarks/fsdp_memory.py --out docs/results/fsdp/fsdp_memory.json [--work DIR]
    python benchmarks/fsdp_memory.py --quick    # a small model: checks that it works
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_layers": 14, "num_heads": 32, "num_kv_heads": 8}
QUICK = {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
PHASES = ["start-up", "step", "save", "final"]


def _status_kib(*fields: str) -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0])
    return values


class Phases:
    """Peak memory of each named phase of this process: the resident-set high-water mark
    (VmHWM, reset at the phase's start through /proc/self/clear_refs: everything mapped,
    file pages included), and the peak of anonymous memory (RssAnon, sampled every 5 ms: what
    the process allocated, without the pages of files it maps, which the kernel can drop)."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, work: Any) -> Any:
        import threading

        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from now
        anon, done = [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                anon[0] = max(anon[0], _status_kib("RssAnon")["RssAnon"])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        try:
            result = work()
        finally:
            done.set()
            sampler.join()
        self.seconds[name] = time.perf_counter() - started
        self.peaks[name] = _status_kib("VmHWM")["VmHWM"] * 1024
        self.anon_peaks[name] = max(anon[0], _status_kib("RssAnon")["RssAnon"]) * 1024
        print(f"[{os.getpid()}] {name}: {self.seconds[name]:.1f} s, peak {self.peaks[name] / 2**30:.2f} GiB, "
              f"anonymous {self.anon_peaks[name] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        return result


def write_result(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


def _model_config(folder: Path):  # type: ignore[no-untyped-def]
    from satrun.config import ModelConfig

    return ModelConfig(name="bench-1b", source="pretrained", path=str(folder))


def _worker(args: argparse.Namespace) -> None:
    """One process (or one FSDP2 rank): the phases, then a JSON line of peaks on stdout."""
    import torch
    from transformers import set_seed

    from satrun.config import OptimConfig
    from satrun.data import collate
    from satrun.models import load_model, load_tokenizer, load_weights
    from satrun.training import checkpoint, distributed, runtime
    from satrun.training.loss import CausalLMObjective
    from satrun.training.optim import build_optimizer
    from satrun.training.saving import save_hf_folder, write_hf_folder
    from satrun.training.trainer import train_step

    if args.tuned:
        runtime.keep_freed_host_memory()
    world = distributed.init_from_env()
    sharded = distributed.sharded_start("fsdp", world)
    work, cpu = Path(args.work), torch.device("cpu")
    cfg = _model_config(work / "model")
    phases = Phases()
    set_seed(0)
    tokenizer = load_tokenizer(cfg)

    def start() -> tuple[Any, Any, Any]:
        model = load_model(cfg, tokenizer, empty=sharded)
        blocks = list(model.model.layers)
        objective = distributed.wrap(CausalLMObjective(model), blocks, "fsdp", world, cpu)
        distributed.materialize(model, cpu, (lambda m: load_weights(m, work / "model")) if sharded else None)
        return model, objective, build_optimizer(model, OptimConfig())

    tokens = torch.randint(0, len(tokenizer), (1, args.seq_len), generator=torch.Generator().manual_seed(world.rank))
    batch = collate([(tokens[0], tokens[0])], 0)
    where = work / ("fsdp" if sharded else "single")
    if not args.resume:
        model, objective, optimizer = phases.run("start-up", start)
        phases.run("step", lambda: train_step(objective, optimizer, [batch], 1.0, runtime.autocast(cpu, torch.float32)))
        state = {"run": {"step": 1}, "rng": checkpoint.rng_state()}
        write = lambda folder: write_hf_folder(model, tokenizer, folder)  # noqa: E731
        phases.run("save", lambda: checkpoint.save_checkpoint(where / "checkpoints", 1, model, optimizer, state, write, 1))
        phases.run("final", lambda: save_hf_folder(model, tokenizer, where / "final"))
    else:
        def resume() -> None:
            saved = checkpoint.load_state(where / "checkpoints" / "step_1")
            model, _, optimizer = start()
            if not saved["sharded"]:
                load_weights(model, where / "checkpoints" / "step_1")
            checkpoint.restore(model, optimizer, saved)
        phases.run("resume", resume)
    if world.main or sharded:
        print(json.dumps({"rank": world.rank, "peaks": phases.peaks, "anon_peaks": phases.anon_peaks,
                          "seconds": phases.seconds}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launch(args: argparse.Namespace, ranks: int, resume: bool) -> list[dict[str, Any]]:
    script = [str(Path(__file__).resolve()), "--worker", "--work", args.work, "--seq-len", str(args.seq_len)]
    script += (["--resume"] if resume else []) + (["--tuned"] if args.tuned else [])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(max(1, args.threads // ranks)))
    if ranks == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *script]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"fsdp_memory: {ranks}-rank run failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')]
    return sorted(rows, key=lambda r: r["rank"])


def _make_model(work: Path, shape: dict[str, int]) -> int:
    """A random Llama-shaped model saved as a safetensors folder with the packaged tokenizer."""
    code = f"""
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from satrun.models.packaged import packaged_model_dir
tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir())
s = {shape!r}
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                     num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                     num_key_value_heads=s["num_kv_heads"], tie_word_embeddings=True,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
model = LlamaForCausalLM(config)
model.to(torch.bfloat16).save_pretrained({str(work / "model")!r})  # 16-bit, as pre-trained Llamas are published
tokenizer.save_pretrained({str(work / "model")!r})
print(sum(p.numel() for p in model.parameters()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"fsdp_memory: could not make the model:\n{done.stderr[-3000:]}")
    return int(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads in all")
    parser.add_argument("--quick", action="store_true", help="a small model: checks that the script works")
    parser.add_argument("--tuned", action="store_true",
                        help="keep freed host memory for reuse, as satrun does in one-process CPU runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="fsdp-memory-")
    work, shape = Path(args.work), QUICK if args.quick else SHAPE
    try:
        parameters = _make_model(work, shape)
        runs: dict[str, list[dict[str, Any]]] = {}
        for name, ranks in (("single", 1), ("fsdp", 2)):
            rows = _launch(args, ranks, resume=False)
            for row, resumed in zip(rows, _launch(args, ranks, resume=True)):
                for key in ("peaks", "anon_peaks", "seconds"):
                    row[key].update(resumed[key])
            runs[name] = rows
            shutil.rmtree(work / name, ignore_errors=True)  # the next run needs the disk
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    result = {"parameters": parameters, "shape": shape, "seq_len": args.seq_len, "threads": args.threads,
              "allocator_tuned": args.tuned, "single": runs["single"], "fsdp_2_ranks": runs["fsdp"]}
    for key, title in (("peaks", "resident high-water mark (VmHWM)"), ("anon_peaks", "anonymous memory (RssAnon)")):
        single = runs["single"][0][key]
        result[f"{key}_ratio_per_rank"] = {phase: [r[key][phase] / single[phase] for r in runs["fsdp"]] for phase in single}
        print(f"{parameters / 1e9:.2f}B parameters, peak {title} per process, GiB:")
        print(f"{'phase':10} {'1 process':>10} " + " ".join(f"{'rank ' + str(r['rank']):>8}" for r in runs["fsdp"])
              + "   max ratio")
        for phase in single:
            ranks = [r[key][phase] for r in runs["fsdp"]]
            print(f"{phase:10} {single[phase] / 2**30:10.2f} " + " ".join(f"{b / 2**30:8.2f}" for b in ranks)
                  + f"   {max(ranks) / single[phase]:.2f}")
    if args.out:
        write_result(result, args.out)


if __name__ == "__main__":
    main()
