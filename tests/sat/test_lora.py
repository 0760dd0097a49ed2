"""SAT with LoRA adapters (peft): the sparse path computes each projection's adapter branch,
restricted to the kept neurons, and equals a dense adapted model with the omitted neurons
masked; the frozen base gets no gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from satrun.config import AdapterConfig
from satrun.models.adapters import add_adapters
from satrun.sat.settings import MetricConfig, SelectorConfig
from satrun.sat import Sparsifier, UnsupportedModel
from tests.sat.models import build
from tests.sat.test_exactness import assert_close, batch, loss_and_grads, masked_reference


def _adapted(arch: str):  # type: ignore[no-untyped-def]
    model = add_adapters(build(arch), AdapterConfig(name="lora", r=4), None)
    with torch.no_grad():  # B starts at zero; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


@pytest.mark.parametrize("fill", ["zero", "mean"])
@pytest.mark.parametrize("arch", ["llama-mha", "qwen2"])
def test_sat_lora_equals_the_masked_dense_adapted_model(arch: str, fill: str) -> None:
    model = _adapted(arch)
    reference = copy.deepcopy(model)
    sat = Sparsifier(model, MetricConfig(name="contrib", token_stride=2), SelectorConfig(name="topk", fill=fill), seed=1)
    sat.set_rates(0.5, 0.5, step=3)
    ids, labels = batch()
    logits, grads = loss_and_grads(model, ids, labels)
    keep = {i: sat.last_selection(i) for i in range(2)}
    assert all(k["channels"] is not None and k["heads"] is not None for k in keep.values())
    handles = masked_reference(reference.get_base_model(), keep)
    ref_logits, ref_grads = loss_and_grads(reference, ids, labels)
    for h in handles:
        h.remove()
    assert_close(logits, ref_logits, "logits")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    for name in trained:
        assert_close(grads[name], ref_grads[name], name)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)  # the base: no gradient


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_token_aware_sat_lora_equals_the_per_token_reference(fill: str) -> None:
    """Rows with a loss through the whole adapted MLP, the others through the kept channels."""
    from tests.sat.test_token_split import per_token_reference, run, sft_batch

    model = _adapted("llama-gqa")
    reference = copy.deepcopy(model)
    sat = Sparsifier(model, MetricConfig(name="contrib", token_stride=2), SelectorConfig(fill=fill), seed=5,
                     tokens="unlabelled")
    sat.set_rates(0.5, 0.0, step=3)
    batch = sft_batch()
    sat.set_token_rows(batch["loss_rows"], batch["free_rows"])
    logits, grads = run(model, batch)
    handles = per_token_reference(reference.get_base_model(), sat, batch)
    ref_logits, ref_grads = run(reference, batch)
    for h in handles:
        h.remove()
    assert_close(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys() and all("lora_" in n for n in grads)
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, name)


def test_an_adapter_layout_the_sparse_path_does_not_compute_is_an_error() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama-mha"), LoraConfig(r=4, target_modules=["gate_proj"], use_dora=True))
    with pytest.raises(UnsupportedModel, match="DoRA"):
        Sparsifier(model, MetricConfig(), SelectorConfig())


def test_activation_checkpointing_of_sat_lora_gives_the_same_adapter_gradients() -> None:
    """Each decoder layer of the peft model recomputed in backward (the layers it adapts are
    found through the wrapper) reuses its selection: the adapter gradients are unchanged."""
    from satrun.training.runtime import decoder_layers, enable_activation_checkpointing
    from tests.sat.test_exactness import with_and_without_checkpointing

    model = _adapted("llama-gqa")
    probe = copy.deepcopy(model)
    enable_activation_checkpointing(probe)
    assert len(decoder_layers(probe)) == 2 and all(layer.gradient_checkpointing for layer in decoder_layers(probe))
    plain, ckpt = with_and_without_checkpointing(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n in plain[1] for n in trained)
    for name in trained:
        assert_close(plain[1][name], ckpt[1][name], name)
