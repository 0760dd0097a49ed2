"""Peak tensor memory of one piece of work, on CUDA and on CPU alike.

CUDA's allocator keeps statistics (``max_memory_allocated``). On CPU torch keeps none, and the
process's resident size mostly shows what the C allocator has cached, not what the work needed.
So on CPU the bytes of live tensor storages are counted op by op with a dispatch mode: every
storage an op creates is added when it appears and subtracted when Python frees it. Like
``max_memory_allocated``, this counts tensor bytes only (no allocator slack, no Python objects).
The mode costs Python time per op, so it measures a step that is not also timed.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storages on ``device`` while the mode is active."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def track(self, tensors: Iterable[Any]) -> None:
        """Count these tensors' storages (once each) until Python frees them."""
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device != self.device:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._sizes:
                continue
            size = storage.nbytes()
            self._sizes[key] = size
            self.live += size
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        from torch._library.custom_ops import OPDEFS  # private, like the mode machinery itself

        opdef = OPDEFS.get(func._schema.name)
        if opdef is None:
            out = func(*args, **(kwargs or {}))
        else:  # a torch.library custom op (e.g. linear_cross_entropy): count its body op by op,
            with self:  # which the mode would otherwise run switched off, missing its buffers
                out = opdef._init_fn(*args, **(kwargs or {}))
        self.track(tree_leaves(out))
        return out


def peak_bytes(work: Callable[[], None], device: torch.device, resident: Iterable[torch.Tensor]) -> int:
    """Peak tensor bytes on ``device`` while ``work()`` runs, counting ``resident`` tensors
    (parameters, optimizer state) from the start. On CUDA: the allocator's own peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    tracker = TensorMemory(device)
    tracker.track(resident)
    with tracker:
        work()
    return tracker.peak


def resident_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What a training step finds in memory: parameters, their gradients, the optimizer state."""
    tensors = [*model.parameters(), *model.buffers()] + [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensors
