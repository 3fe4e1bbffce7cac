"""The TensorSource the engine reads one tensor through: row ranges of the base and the K tasks.

A full fine-tune hands out theta_k rows (read-only mmap views, the engine subtracts); an adapter hands
out tau_k rows directly (`task_delta`), computed from its low-rank factors for just those rows.
"""
from __future__ import annotations

import numpy as np
import torch

from ..checkpoints import Checkpoint


def is_adapter(model) -> bool:
    return getattr(model, "is_adapter", False)


class RowSource:
    """A tensor of the K+1 inputs as row ranges of read-only mmap views (never written)."""

    def __init__(self, base: Checkpoint, models: tuple, name: str):
        self._base, self._models, self._name = base, models, name
        info = base.tensors[name]
        self.shape = tuple(info.shape)
        self.rows = self.shape[0] if self.shape else 1
        self.row_numel = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        self._last: tuple[Checkpoint, int, int] | None = None

    def _view(self, ckpt: Checkpoint, r0: int, r1: int) -> torch.Tensor:
        # The engine copies each view into its float32 buffers before asking for the next, so the
        # previous view's pages can leave this process: mapped input stays at one view at a time.
        self.release()
        self._last = (ckpt, r0, r1)
        if not self.shape:  # a 0-d tensor is one row of one element
            return ckpt.view(self._name).reshape(1)
        return ckpt.view(self._name, r0, r1)

    def release(self) -> None:
        if self._last is not None:
            ckpt, r0, r1 = self._last
            ckpt.release(self._name, r0, r1)
            self._last = None

    def base(self, r0: int, r1: int) -> torch.Tensor:
        return self._view(self._base, r0, r1)

    def task(self, k: int, r0: int, r1: int) -> torch.Tensor:
        return self._view(self._models[k], r0, r1)

    def task_delta(self, k: int, r0: int, r1: int) -> torch.Tensor | None:
        """tau_k rows for an adapter (float32), None for a full fine-tune (the engine subtracts)."""
        m = self._models[k]
        if not is_adapter(m):
            return None
        self.release()
        d = m.delta(self._name, self.shape, r0, r1, self._base)
        m.release(self._name)
        if m.touched(self._name):       # a saved tensor (tau = saved - base) read base rows
            self._base.release(self._name, r0, r1)
        return d
