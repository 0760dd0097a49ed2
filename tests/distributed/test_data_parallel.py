"""Two CPU ranks (gloo) train exactly like one process on the global batch: DDP and FSDP2,
dense and SAT, and token-aware SAT on packed chats; FSDP2 starting from the meta device (random weights broadcast from the first
rank, or pre-trained weights read shard by shard); one run folder; launcher=torchrun; exact
resume under DDP and from FSDP2's sharded checkpoints.

The two-rank trainings the tests compare share one torchrun launch (tests/distributed/ranks.py
runs them one after another on each rank); the launcher, signal and sweep tests start
``satrun`` itself as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import read_jsonl, run_in_process, run_satrun

pytestmark = pytest.mark.slow  # ranks in subprocesses (torchrun)

RUN = ["model=tiny", "trainer.seq_len=64", "trainer.max_steps=4", "trainer.eval_every=0", "trainer.eval_batches=1",
       "trainer.log_every=1"]
SCHEDULERS = {"dense": ["scheduler=dense"],
              "sat": ["scheduler=constant", "scheduler.rate=0.5", "scheduler.attn_rate=0.5"],
              # packed chats, only the unlabelled tokens sparse; random scores and no fill, so that the
              # selection cannot depend on which rank scored which tokens (a stride picks other tokens from
              # a rank's share than from the whole batch, and a near-tie of scores summed in another order
              # can flip a channel)
              "sft-sat": ["mode=sft", "data=chatterbot", "scheduler=constant", "scheduler.rate=0.5", "scheduler.attn_rate=0",
                          "metric=random", "selector.fill=zero"],
              "lora": ["scheduler=dense", "adapter=lora", "adapter.r=4", "optim.lr=1e-2"],
              # the forward dense, the backward on the kept channels (all tokens; the unlabelled ones)
              "backward": ["scheduler=constant", "scheduler.rate=0.5", "scheduler.attn_rate=0", "scheduler.omit=backward",
                           "metric=random"],
              "sft-backward": ["mode=sft", "data=chatterbot", "scheduler=constant", "scheduler.rate=0.5",
                               "scheduler.attn_rate=0", "scheduler.omit=backward", "metric=random"]}


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "satrun", "train",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process, micro-batch 4: the global batch of two ranks with micro-batch 2 (in this
    process: the tests only read these runs)."""
    root = tmp_path_factory.mktemp("single")
    for name, scheduler in SCHEDULERS.items():
        result = run_in_process(["train", *RUN, *scheduler, "trainer.micro_batch_size=4", f"hydra.run.dir={name}"], root)
        assert result.returncode == 0, name
    return {name: root / name for name in SCHEDULERS}


EQUAL = [("ddp", "dense"), ("fsdp", "dense"), ("ddp", "sft-sat"), ("ddp", "lora"), ("ddp", "backward"), ("fsdp", "backward"),
         ("ddp", "sft-backward")]
SAT_ON_TWO = [*RUN, *SCHEDULERS["sat"], "trainer.micro_batch_size=2", "trainer.save_every=2"]
PRETRAINED = ["model.source=pretrained", "+model.path={dense}", "trainer.max_steps=2"]
# random scores: the selection cannot depend on which rank scored which tokens (contrib's scores,
# summed as squares over ranks in another order than one process sums them, can flip a near-tie)
LORA_SAT = [*RUN, "model.source=pretrained", "+model.path={dense}", "adapter=lora", "adapter.r=4", "optim.lr=1e-2",
            *SCHEDULERS["sat"], "metric=random"]
LORA_SHARDED = [*LORA_SAT, "trainer.micro_batch_size=2", "trainer.strategy=fsdp", "trainer.save_every=2"]
BF16 = [*RUN, "scheduler=dense", "trainer.precision=bf16", "trainer.max_steps=2"]


def _plan() -> list[dict]:
    """Every two-rank training of the tests below that launches ``satrun train`` itself: one
    torchrun launch for them all (tests/distributed/ranks.py), in the order they depend on."""
    jobs = [{"name": f"{strategy}-{scheduler}",
             "args": [*RUN, *SCHEDULERS[scheduler], "trainer.micro_batch_size=2", f"trainer.strategy={strategy}"]}
            for strategy, scheduler in EQUAL]
    jobs.append({"name": "accum-fsdp", "args": [*RUN, *SCHEDULERS["dense"], "trainer.micro_batch_size=1",
                                                "trainer.grad_accum=2", "trainer.strategy=fsdp", "hydra.run.dir=accum"]})
    for strategy in ("ddp", "fsdp"):
        jobs.append({"name": f"full-{strategy}", "args": [*SAT_ON_TWO, f"trainer.strategy={strategy}"]})
        jobs.append({"name": f"resumed-{strategy}", "args": [*SAT_ON_TWO, f"trainer.strategy={strategy}",
                                                             f"resume={{run:full-{strategy}}}/checkpoints/step_2",
                                                             "hydra.run.dir=resumed"]})
    jobs.append({"name": "pretrained", "args": [*RUN, *PRETRAINED, "scheduler=dense", "trainer.micro_batch_size=2",
                                                "trainer.strategy=fsdp", "hydra.run.dir=two"]})
    jobs.append({"name": "lora-full", "folder": "lora", "args": [*LORA_SHARDED, "hydra.run.dir=full"]})
    jobs.append({"name": "lora-resumed", "folder": "lora",
                 "args": [*LORA_SHARDED, "resume=full/checkpoints/step_2", "hydra.run.dir=resumed"]})
    jobs.append({"name": "bf16", "args": [*BF16, "trainer.micro_batch_size=2", "trainer.strategy=fsdp", "hydra.run.dir=two"]})
    return jobs


class Launch:
    """The jobs of one torchrun launch: each job's status and folder."""

    def __init__(self, root: Path, result: subprocess.CompletedProcess, plan: list[dict]) -> None:
        self.root, self.result = root, result
        self.statuses = json.loads((root / "status.json").read_text()) if (root / "status.json").is_file() else {}
        self.folders = {job["name"]: root / job.get("folder", job["name"]) for job in plan}

    def job(self, name: str) -> Path:
        """The folder of a job that trained to its end (else the launch's output fails the test)."""
        assert self.statuses.get(name) == 0, (name, self.statuses, self.result.stderr[-3000:])
        return self.folders[name]


@pytest.fixture(scope="module")
def launched(single, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    root = tmp_path_factory.mktemp("two-ranks")
    plan = [{**job, "args": [arg.replace("{dense}", str(single["dense"] / "final")) for arg in job["args"]]}
            for job in _plan()]
    (root / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("SATRUN_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             str(Path(__file__).with_name("ranks.py")), str(root / "plan.json")],
                            cwd=root, env=env, capture_output=True, text=True, timeout=900)
    return Launch(root, result, plan)


def assert_same_training(run: Path, reference: Path) -> None:
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    expected = [r["loss"] for r in read_jsonl(reference / "metrics.jsonl") if r["kind"] == "train"]
    assert losses == pytest.approx(expected, rel=1e-5)
    assert_same_final(run, reference)


def assert_same_final(run: Path, reference: Path) -> None:
    assert_same_weights(run / "final", reference / "final")
    if (reference / "final" / "adapter").is_dir():  # and the adapters, in peft's format
        from safetensors.torch import load_file

        got, want = (load_file(r / "final" / "adapter" / "adapter_model.safetensors") for r in (run, reference))
        assert got.keys() == want.keys() and len(want) > 0
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def assert_same_weights(folder: Path, reference: Path) -> None:
    """Both folders load in transformers, to the same weights (FSDP2 writes joined shards)."""
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    want = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def two_ranks_equal_one_process(job: Path, reference: Path) -> Path:
    """A two-rank run in its default run folder, chosen once for both ranks, trained as one
    process did on the global batch; returns the run folder."""
    runs = list((job / "outputs" / "runs").iterdir())
    assert len(runs) == 1  # one run folder, chosen once for both ranks
    assert len(list(job.rglob("metrics.jsonl"))) == 1
    assert (runs[0] / ".hydra" / "config.yaml").is_file()
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["tokens_per_s_per_rank"] == pytest.approx(summary["tokens_per_s"] / 2)
    assert_same_training(runs[0], reference)
    return runs[0]


@pytest.mark.parametrize("strategy,scheduler", EQUAL)
def test_two_ranks_equal_one_process_on_the_global_batch(single, launched, strategy: str, scheduler: str) -> None:
    """(SAT under DDP and FSDP2: test_resume_continues_exactly's runs; FSDP2 LoRA: below.)"""
    two_ranks_equal_one_process(launched.job(f"{strategy}-{scheduler}"), single[scheduler])


@pytest.mark.parametrize("strategy", ["fsdp"])  # DDP's no_sync is counted in test_gradient_sync.py
def test_two_ranks_accumulating_micro_batches_equal_one_process(single, launched, strategy: str) -> None:
    """Two micro-batches of one sequence on each of two ranks, gradients reduced after the
    second only, give the step of one process's micro-batch of four (dense: SAT selects per
    micro-batch, so its selections follow the micro-batch size)."""
    assert_same_training(launched.job(f"accum-{strategy}") / "accum", single["dense"])


def test_launcher_torchrun_starts_the_ranks_itself(single, tmp_path: Path) -> None:
    result = run_satrun(["train", *RUN, *SCHEDULERS["sat"], "trainer.micro_batch_size=2", "launcher=torchrun",
                         "launcher.nproc_per_node=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and len(list(tmp_path.rglob("metrics.jsonl"))) == 1
    assert_same_training(runs[0], single["sat"])
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(runs[0] / "final").config.num_hidden_layers == 2


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_continues_exactly(single, launched, tmp_path: Path, strategy: str) -> None:
    """SAT on two ranks trains as one process on the global batch, and resumes exactly."""
    full = two_ranks_equal_one_process(launched.job(f"full-{strategy}"), single["sat"])
    resumed = launched.job(f"resumed-{strategy}") / "resumed"
    full_losses = {r["step"]: r["loss"] for r in read_jsonl(full / "metrics.jsonl") if r["kind"] == "train"}
    resumed_losses = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl") if r["kind"] == "train"}
    assert sorted(resumed_losses) == [3, 4] and all(resumed_losses[s] == full_losses[s] for s in resumed_losses)
    assert_same_weights(resumed / "final", full / "final")
    step = full / "checkpoints" / "step_2"
    if strategy == "fsdp":  # each rank wrote its own shards; no whole model anywhere
        assert sorted(p.name for p in (step / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert not list(step.glob("*.safetensors"))
        alone = run_satrun(["train", *SAT_ON_TWO, f"trainer.strategy={strategy}", f"resume={step}", "hydra.run.dir=alone"],
                           tmp_path)
        assert alone.returncode == 2 and len(alone.stderr.strip().splitlines()) == 1, alone.stderr
        assert "written by 2 FSDP2 ranks" in alone.stderr
    else:  # DDP: the first rank's model folder
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(step).model.embed_tokens.weight.shape == (49152, 64)


def test_fsdp_reads_pretrained_weights_shard_by_shard(single, launched, tmp_path: Path) -> None:
    """Each rank builds the model on the meta device and reads only its rows of the weights."""
    pretrained = [arg.replace("{dense}", str(single["dense"] / "final")) for arg in PRETRAINED]
    one = run_in_process(["train", *RUN, *pretrained, "scheduler=dense", "trainer.micro_batch_size=4", "hydra.run.dir=one"],
                         tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_training(launched.job("pretrained") / "two", tmp_path / "one")


def test_fsdp_lora_on_pretrained_weights_with_sat_equals_one_process_and_resumes_exactly(single, launched,
                                                                                       tmp_path: Path) -> None:
    """LoRA under FSDP2 from the meta device: each rank reads its rows of the frozen base, the
    adapters start from the seed's values, SAT's sparse steps train them; checkpoints hold the
    adapters' and the optimizer's shards only, and a resume from one continues exactly."""
    args = [arg.replace("{dense}", str(single["dense"] / "final")) for arg in LORA_SAT]
    one = run_in_process(["train", *args, "trainer.micro_batch_size=4", "hydra.run.dir=one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    launched.job("lora-full")
    lora = launched.job("lora-resumed")
    assert_same_training(lora / "full", tmp_path / "one")
    step = lora / "full" / "checkpoints" / "step_2" / "shards"
    base = sum(p.stat().st_size for p in (single["dense"] / "final").glob("*.safetensors"))
    assert 0 < sum(p.stat().st_size for p in step.glob("*.distcp")) < base / 10  # no frozen base in it
    losses = [{r["step"]: r["loss"] for r in read_jsonl(lora / run / "metrics.jsonl") if r["kind"] == "train"}
              for run in ("resumed", "full")]
    assert sorted(losses[0]) == [3, 4] and all(losses[0][s] == losses[1][s] for s in losses[0])
    assert_same_final(lora / "resumed", lora / "full")


def test_a_sweep_under_torchrun_is_refused(tmp_path: Path) -> None:
    result = torchrun(["-m", *RUN, "optim.lr=1e-3,2e-3"], tmp_path)
    assert result.returncode != 0 and "cannot run under torchrun" in result.stderr


def _stop_launcher_run(tmp_path: Path, send) -> tuple[subprocess.Popen, str]:  # type: ignore[no-untyped-def]
    import time

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "satrun", "train", *RUN, "trainer.max_steps=2000",
                             "trainer.micro_batch_size=2", "launcher=torchrun", "launcher.nproc_per_node=2",
                             "hydra.run.dir=run"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    send(proc)
    _, stderr = proc.communicate(timeout=120)
    return proc, stderr


@pytest.mark.parametrize("how", ["ctrl-c to the group", "sigterm to the launcher"])
def test_launcher_torchrun_ranks_save_and_exit_on_a_signal(tmp_path: Path, how: str) -> None:
    import signal

    if how == "ctrl-c to the group":
        proc, stderr = _stop_launcher_run(tmp_path, lambda p: os.killpg(p.pid, signal.SIGINT))
        assert proc.returncode == 130, stderr[-2000:]
    else:
        proc, stderr = _stop_launcher_run(tmp_path, lambda p: p.send_signal(signal.SIGTERM))
        assert proc.returncode == 143, stderr[-2000:]
    assert "resume=" in stderr.strip().splitlines()[-1]
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 1


def test_fsdp_bf16_computes_in_bf16_and_keeps_fp32_masters(launched, tmp_path: Path) -> None:
    """FSDP2's MixedPrecisionPolicy: bf16 compute close to one bf16-autocast process, weights fp32."""
    one = run_in_process(["train", *BF16, "trainer.micro_batch_size=4", "hydra.run.dir=one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launched.job("bf16") / "two"
    losses = [[r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"] for run in (two, tmp_path / "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-2) and losses[0] != losses[1]  # bf16 weights, not fp32
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(two / "final")
    assert {p.dtype for p in final.state_dict().values()} == {torch.float32}
