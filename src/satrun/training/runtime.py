"""Device and precision: the few places where CPU and CUDA differ.

Seeding is ``transformers.set_seed`` (Python, NumPy and torch on every device).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys

import torch

from satrun.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"trainer.device={name!r} is not a device (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    if device.type == "cuda" and device.index is not None:
        # The named GPU becomes the current one: kernels, the caching allocator, NCCL and
        # torch.cuda's own calls without a device then all use it, not GPU 0. A plain "cuda"
        # touches no GPU here: under torchrun each rank takes its own (distributed.device_of).
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"trainer.device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(device.index)
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: bf16 on CUDA by default, fp32 (no autocast) elsewhere. ``tf32``: fp32
    with the matmuls and convolutions in TF32 (CUDA only; from here on in this process)."""
    if name == "tf32":
        if device.type != "cuda":
            raise UsageError(f"trainer.precision=tf32 needs a CUDA device (this run is on {device.type}); use fp32")
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context; parameters and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context of a ``trainer.precision`` setting on ``device``."""
    return autocast(device, resolve_precision(precision, device))


def keep_freed_host_memory() -> bool:
    """Let glibc keep large freed blocks for reuse instead of handing them back to the kernel.

    By default glibc maps every allocation over a threshold afresh and unmaps it when freed, and
    trims the heap top, so each CPU training step maps new pages that the kernel zero-fills on
    first touch: about 300,000 page faults, a fifth of a dense SmolLM2-135M step, and more for
    larger tensors. CUDA's caching allocator keeps its blocks for the same reason. The cost is
    that the process keeps its peak host memory. Returns whether glibc accepted the settings
    (False off glibc; an allocator preloaded in glibc's place ignores them).
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    # Recent glibc accepts a 1 GiB mmap threshold; older ones cap it at 32 MiB, so there mmap is
    # switched off instead (every block then comes from the heap, which is never trimmed).
    no_fresh_maps = bool(mallopt(m_mmap_threshold, 1 << 30)) or bool(mallopt(m_mmap_max, 0))
    return bool(mallopt(m_trim_threshold, 1 << 30)) and no_fresh_maps


# Dense bf16 tensor-core peaks per GPU (no structured sparsity), FLOP/s, from NVIDIA's data
# sheets, by a part of the CUDA device name: the most specific first (an "H100 NVL" is not an
# "H100" SXM, an "L40" not an "L4").
BF16_PEAK_FLOPS = (("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
                   ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12))


def bf16_peak_for(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name`` (as torch.cuda.get_device_name says), if listed."""
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak for steps computed in ``dtype``, where known: listed GPUs under bf16
    (None on CPU, on other GPUs and in fp32; ``trainer.peak_flops`` gives it by hand)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    return bf16_peak_for(torch.cuda.get_device_name(device))


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory (CUDA only; None on CPU, where torch does not track it)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def memory_hint(device: torch.device) -> str:
    """The device's memory use, for an out-of-memory message (empty on CPU)."""
    if device.type != "cuda":
        return ""
    _, total = torch.cuda.mem_get_info(device)
    return (f" (CUDA memory: peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB, "
            f"reserved {torch.cuda.memory_reserved(device) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB)")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A transformers causal LM's decoder layers (of the model a peft model adapts), or none."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return list(getattr(getattr(model, "model", model), "layers", []))


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer in place (as torchtitan does, before FSDP2 wraps it):
    one compiled graph serves every layer of the same shapes. Returns the layers compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
