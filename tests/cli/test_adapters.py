"""adapter=lora: peft's LoRA on the frozen base, small checkpoints, exact resume, and a final
folder that loads both ways (merged, and base + adapter with PeftModel)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import TINY, read_jsonl, run_in_process

LORA = [*TINY, "adapter=lora", "adapter.r=4", "scheduler=dense", "trainer.max_steps=4", "trainer.log_every=1",
        "trainer.eval_every=0", "optim.lr=1e-2"]


def test_only_the_adapters_train_and_the_base_stays_bit_identical(tmp_path: Path, tokenizer) -> None:
    from satrun.config import AdapterConfig, DataConfig, ModelConfig, OptimConfig, TrainerConfig
    from satrun.data import build_corpus
    from satrun.models import load_model
    from satrun.models.adapters import add_adapters
    from satrun.training.display import LogDisplay
    from satrun.training.optim import build_optimizer
    from satrun.training.run import RunIO
    from satrun.training.trainer import train

    torch.manual_seed(0)
    base = load_model(ModelConfig(name="tiny", source="random"), tokenizer)
    before = copy.deepcopy(base.state_dict())
    model = add_adapters(base, AdapterConfig(name="lora", r=4), None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for group in build_optimizer(model, OptimConfig()).param_groups for p in group["params"]) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"paragraph {i} with a few words in it" for i in range(80)))
    corpus = build_corpus(DataConfig(name="text", format="text", path=str(text)), "cpt", tokenizer, 32, 2, 0)
    train(model, corpus, TrainerConfig(max_steps=5, seq_len=32, micro_batch_size=2, device="cpu"), OptimConfig(lr=1e-2),
          RunIO(tmp_path, LogDisplay()))
    after = model.get_base_model().state_dict()
    for name, tensor in before.items():  # peft keeps each adapted weight as base_layer.weight
        key = name if name in after else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(after[key], tensor), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)  # B moved


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dense LoRA run of LORA, checkpointed every 2 steps, which the tests below only read."""
    root = tmp_path_factory.mktemp("lora")
    assert run_in_process(["train", *LORA, "trainer.save_every=2", "hydra.run.dir=run"], root).returncode == 0
    return root / "run"


def test_lora_checkpoints_hold_the_adapters_and_resume_exactly(satrun, tmp_path: Path, lora_run: Path) -> None:
    step = lora_run / "checkpoints" / "step_2"
    assert (step / "adapter" / "adapter_model.safetensors").is_file() and not list(step.glob("*.safetensors"))
    resumed = satrun("train", *LORA, "trainer.save_every=2", f"resume={step}", "hydra.run.dir=resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = lambda run: {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"}  # noqa: E731
    got, want = losses(tmp_path / "resumed"), losses(lora_run)
    assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in got)

    from safetensors.torch import load_file

    a = load_file(tmp_path / "resumed" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(lora_run / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_final_folder_loads_merged_and_as_base_plus_adapter(satrun, tmp_path: Path, lora_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = lora_run / "final"
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(lora_run / "base")
    adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted(ids).logits, merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a fresh base: PeftModel.from_pretrained put the adapters into the first
        plain = AutoModelForCausalLM.from_pretrained(lora_run / "base")(ids).logits
    assert not torch.allclose(plain, want)  # the adapters changed the model
    import json

    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (lora_run / "base").resolve()
    # satrun generate: the merged final/, its adapter on the base it names, a checkpoint's adapter
    outputs = []
    for name, run in (("merged", lora_run), ("adapter", final / "adapter"), ("checkpoint", lora_run / "checkpoints" / "step_4")):
        done = satrun("generate", f"generate.run={run}", "generate.prompt=[In the beginning]", "generate.max_new_tokens=5",
                      "generate.chat=off", f"hydra.run.dir=gen-{name}")
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads((tmp_path / f"gen-{name}" / "generations.jsonl").read_text())["output"])
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0]


def test_sat_lora_trains_the_adapters_and_leaves_the_base_alone(satrun, tmp_path: Path, lora_run: Path) -> None:
    """SAT with LoRA: the sparse steps train the adapters (the loss moves like the dense LoRA
    run's), and the base saved at the end is bit for bit the dense LoRA run's (both untouched)."""
    from safetensors.torch import load_file

    sat = satrun("train", *[a for a in LORA if a != "scheduler=dense"], "scheduler=constant", "scheduler.rate=0.5",
                 "scheduler.attn_rate=0.5", "hydra.run.dir=sat")
    assert sat.returncode == 0, sat.stderr[-3000:]
    a, b = (load_file(run / "base" / "model.safetensors") for run in (lora_run, tmp_path / "sat"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from peft import PeftModel  # the merged final/ is that base plus the adapters: training left the base alone
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sat" / "final").eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "sat" / "base")
        adapted = PeftModel.from_pretrained(base, tmp_path / "sat" / "final" / "adapter").eval()(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    adapters = load_file(tmp_path / "sat" / "final" / "adapter" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapters.items() if "lora_B" in k)  # B left zero: they trained
    losses = [r["loss"] for r in read_jsonl(tmp_path / "sat" / "metrics.jsonl") if r["kind"] == "train"]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("overrides, says", [
    (["adapter.target_modules=[wq]"], "adapter.target_modules"),
    (["adapter=none", "adapter.r=8"], "does nothing with adapter=none"),
])
def test_what_lora_cannot_do_yet_is_one_line(satrun, overrides: list[str], says: str) -> None:
    result = satrun("train", *[a for a in LORA if not a.startswith("scheduler=")], *overrides, "hydra.run.dir=bad")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert len(errors) == 1 and says in errors[0], result.stderr[-2000:]


def test_a_lora_checkpoint_is_not_resumed_without_its_adapters(satrun, tmp_path: Path) -> None:
    full = satrun("train", *LORA, "trainer.max_steps=2", "trainer.save_every=2", "hydra.run.dir=full")
    assert full.returncode == 0, full.stderr[-3000:]
    plain = [a for a in LORA if not a.startswith("adapter")]
    again = satrun("train", *plain, "trainer.max_steps=2", "resume=full", "hydra.run.dir=again")
    assert again.returncode == 2 and "adapter.name=lora -> none" in again.stderr, again.stderr[-2000:]
