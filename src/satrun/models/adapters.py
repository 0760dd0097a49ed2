"""Parameter-efficient fine-tuning: LoRA adapters through peft, beside the model loading.

``add_adapters`` wraps a transformers model in a ``peft.PeftModel`` whose LoRA weights alone
require gradients; the base weights stay frozen (and bit-identical). The adapters are saved
and loaded in peft's own format (``adapter_config.json``, ``adapter_model.safetensors``), so a
``final/adapter`` folder loads with ``PeftModel.from_pretrained`` onto the base model its
config names, and ``save_merged`` writes the base with the adapters folded in as a plain
Hugging Face folder.

Under FSDP2 the model's parameters are shards (DTensors): the base is filled under its Hugging
Face names (``base_weights``), the adapters from their seeded initial values
(``initial_adapter_state``), and the final folder is written from shards as well: the merged
weights are each rank's base shard plus its rows of ``scale * B @ A`` (``merged_weights``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from satrun.config import AdapterConfig, ModelConfig
from satrun.errors import UsageError

ADAPTER_FOLDER = "adapter"  # inside final/ and each checkpoint
BASE_FOLDER = "base"  # in the run folder, for a random base model: the base every saved adapter applies to


def weights_source(cfg: ModelConfig, run_dir: Path) -> str:
    """Where the base weights come from, for the adapter's config: the model folder or hub id,
    or for a random model the copy of it the run writes into its folder at the start (so that
    checkpoints load before the run ends)."""
    if cfg.source == "random":
        return str((run_dir / BASE_FOLDER).resolve())
    if cfg.source == "packaged":
        from satrun.models.packaged import packaged_model_dir

        return str(packaged_model_dir())
    assert cfg.path, "validated in config"
    return cfg.path


def add_adapters(model: PreTrainedModel, cfg: AdapterConfig, base: Optional[str], seed: Optional[int] = None) -> torch.nn.Module:
    """``model`` with LoRA adapters on ``cfg.target_modules`` (``cfg.name == "none"``: unchanged).
    ``base``: where the base weights come from (a folder or hub id), written into
    adapter_config.json so the saved adapter names its base model. ``seed``: the adapters'
    initial values are drawn from it alone (peft's initialisation, in module order), whatever
    the model's loading drew before, so that a model built on the meta device (FSDP2) gets the
    same adapters from :func:`initial_adapter_state`; None: from the global generator."""
    if cfg.name == "none":
        return model
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(cfg.target_modules) - present)
    if missing:
        raise UsageError(f"adapter.target_modules: {missing} are not modules of this model "
                         f"(its projections: {', '.join(sorted(p for p in present if p.endswith('_proj')))})")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a question transformers 5 renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = get_peft_model(model, config)
    if base is not None:  # peft takes the model's own name_or_path, which a random model lacks
        adapted.peft_config["default"].base_model_name_or_path = base
    if seed is not None and not any(p.is_meta for p in adapted.parameters()):
        initial_adapter_state(adapted, seed)  # re-initialises the real adapters in place
    return adapted


def _seeded_layers(model: torch.nn.Module, seed: int) -> Iterator[tuple[str, torch.nn.Module]]:
    """Each LoRA layer of ``model`` (name, layer) with its adapters re-initialised by peft from a
    generator seeded with ``seed``, in module order. A layer on the meta device is initialised
    as a copy whose adapters alone live on the CPU (the base stays on meta)."""
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if any(p.is_meta for p in layer.lora_A.parameters()):
                layer = copy.deepcopy(layer)
                layer.lora_A.to_empty(device="cpu")
                layer.lora_B.to_empty(device="cpu")
            for adapter in layer.lora_A:
                layer.reset_lora_parameters(adapter, model.peft_config[adapter].init_lora_weights)
            yield name, layer


def initial_adapter_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The adapters' initial values as :func:`add_adapters` with ``seed`` gives them, as whole
    CPU tensors under ``model.state_dict()``'s names, for a model whose parameters are still on
    the meta device."""
    state = {}
    for name, layer in _seeded_layers(model, seed):
        for part in ("lora_A", "lora_B"):
            for adapter, linear in getattr(layer, part).items():
                state[f"{name}.{part}.{adapter}.weight"] = linear.weight.detach()
    return state


def is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name


def base_name(name: str) -> str:
    """A parameter's name in the base model's Hugging Face folder (peft's wrapping removed)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters under their Hugging Face names (a tied one once): for a
    model without adapters its own ``named_parameters()``."""
    return {base_name(name): p.detach() for name, p in model.named_parameters() if not is_adapter_parameter(name)}


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_adapters(model: torch.nn.Module, folder: Path) -> None:
    """The adapter weights and their config (peft's format) into ``folder``. Every rank calls
    it: FSDP2's shards are joined first (the adapters are small), the first rank writes."""
    from satrun.training import distributed

    state = distributed.full_trainable_state(model) if distributed.is_sharded(model) else None
    if distributed.current().main:
        # the embeddings are not adapted: no need for peft to look for the base's vocabulary
        model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False, state_dict=state)


def load_adapters(model: torch.nn.Module, folder: Path) -> None:
    """Adapter weights saved by :func:`save_adapters` into ``model`` (its adapters replaced)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise UsageError(f"{folder}: no adapter_model.safetensors to resume the adapters from")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    if getattr(result, "unexpected_keys", None):
        raise UsageError(f"{folder}: adapter weights do not match the model (unexpected {result.unexpected_keys[:3]})")


def is_adapter_folder(folder: Path) -> bool:
    """A folder of adapters in peft's format (adapter_config.json beside the weights)."""
    return (folder / "adapter_config.json").is_file()


def load_adapted(folder: Path) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """The tokenizer and the model of an adapter folder: the base model its adapter_config.json
    names, with the adapters applied (peft's AutoPeftModelForCausalLM), in fp32."""
    from peft import AutoPeftModelForCausalLM, PeftConfig
    from transformers import AutoTokenizer

    base = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    if Path(base).is_absolute() and not (Path(base) / "config.json").is_file():
        raise UsageError(f"{folder}: its adapter_config.json names the base model {base}, which is not there "
                         "(moved or deleted?); put the base back there, or set base_model_name_or_path in that file")
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return AutoTokenizer.from_pretrained(base), model


def save_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The base model with the adapters folded into its weights, as a plain Hugging Face folder
    (from a copy: the model keeps training, sampling or generating with its adapters)."""
    from satrun.training import distributed
    from satrun.training.saving import write_hf_folder

    if distributed.is_sharded(model):  # peft merges whole tensors in place; here each rank merges its rows
        write_hf_folder(model.get_base_model(), tokenizer, folder, state=merged_weights(model))
    else:
        write_hf_folder(copy.deepcopy(model).merge_and_unload(), tokenizer, folder)


def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights with each adapter folded in (``W + scale * B @ A``), under the base's
    Hugging Face names, without changing the model. Under FSDP2 every rank gets its own rows:
    the adapters are joined (small), the base shards stay shards."""
    from peft.tuners.lora import LoraLayer
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = base_weights(model)
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        weight = layer.get_base_layer().weight
        for adapter in layer.active_adapters:
            a, b = (getattr(layer, part)[adapter].weight.detach() for part in ("lora_A", "lora_B"))
            if isinstance(a, DTensor):
                a, b = a.full_tensor(), b.full_tensor()
            delta = (b @ a) * layer.scaling[adapter]
            if isinstance(weight, DTensor):  # this rank's rows of it, no communication
                delta = distribute_tensor(delta, weight.device_mesh, weight.placements, src_data_rank=None)
            key = base_name(f"{name}.weight")
            state[key] = state[key] + delta.to(weight.dtype)
    return state


def save_base(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The base model without its adapters (a random base exists nowhere else), written once,
    atomically, by the one process that holds it whole (before any FSDP2 wrapping)."""
    from satrun.training.saving import staged_folder

    if (folder / "config.json").is_file():  # a resumed run's: the same seeded base
        return
    with staged_folder(folder, shared=True) as staging:
        copy.deepcopy(model).unload().save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
