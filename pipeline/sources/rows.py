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

    def __init__(self, base: Checkpoint, models: tuple, name: str, vocab=None):
        self._base, self._models, self._name = base, models, name
        info = base.tensors[name]
        # an extended vocabulary tensor (sources.vocab): V output rows, each model's own row count
        self._ext = vocab.rows.get(name) if vocab is not None and vocab.extended else None
        self._v0 = info.rows
        self.shape = vocab.shape(name, tuple(info.shape)) if self._ext else tuple(info.shape)
        self.rows = self.shape[0] if self.shape else 1
        self.row_numel = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        self._last: tuple[Checkpoint, int, int] | None = None
        self._ext_cache: tuple[int, int, torch.Tensor] | None = None

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
        if self._ext and r1 > self._v0:
            return self._ext_base(r0, r1)
        return self._view(self._base, r0, r1)

    def task(self, k: int, r0: int, r1: int) -> torch.Tensor:
        return self._view(self._models[k], r0, r1)

    def _ext_base(self, r0: int, r1: int) -> torch.Tensor:
        """float32 base rows where rows >= V0 are the mean of the models that have them (SPEC 5)."""
        if self._ext_cache is not None and self._ext_cache[:2] == (r0, r1):
            return self._ext_cache[2]
        out = torch.empty((r1 - r0, *self.shape[1:]), dtype=torch.float32)
        if r0 < self._v0:
            out[: self._v0 - r0].copy_(self._view(self._base, r0, self._v0))
        lo = max(r0, self._v0)
        acc = torch.zeros((r1 - lo, *self.shape[1:]), dtype=torch.float64)
        count = torch.zeros((r1 - lo,), dtype=torch.float64)
        for m, rows in zip(self._models, self._ext):
            hi = min(r1, rows)
            if hi > lo:       # an adapter's rows there: its saved full tensor (+ its LoRA update)
                acc[: hi - lo] += (self._theta_rows(m, lo, hi) if is_adapter(m) else self._view(m, lo, hi)).double()
                count[: hi - lo] += 1
        self.release()
        out[lo - r0:].copy_(acc / count.view(-1, *([1] * (acc.dim() - 1))))
        self._ext_cache = (r0, r1, out)
        return out

    def _ext_delta(self, k: int, r0: int, r1: int) -> torch.Tensor:
        """tau_k rows of an extended tensor: theta_k - base where model k has the row, else 0."""
        m, rows = self._models[k], self._ext[k]
        out = torch.zeros((r1 - r0, *self.shape[1:]), dtype=torch.float32)
        if not is_adapter(m):
            b = self._ext_base(r0, r1) if r1 > self._v0 else self._view(self._base, r0, r1).float()
            hi = min(r1, rows)
            if hi > r0:
                out[: hi - r0].copy_(self._view(m, r0, hi))
                out[: hi - r0].sub_(b[: hi - r0])
            self.release()
            return out
        hi = min(r1, rows, self._v0)         # the base's rows: tau from the adapter itself
        if hi > r0:
            d = m.delta(self._name, (self._v0, *self.shape[1:]), r0, hi, self._base)
            out[: hi - r0] = d.reshape(hi - r0, *self.shape[1:])
        lo, hi = max(r0, self._v0), min(r1, rows)
        if hi > lo:                          # rows the base lacks: the adapter's rows - the extended base
            b = self._ext_base(r0, r1)
            out[lo - r0: hi - r0] = self._theta_rows(m, lo, hi) - b[lo - r0: hi - r0]
        m.release(self._name)
        self._base.release(self._name)
        self.release()
        return out

    def _theta_rows(self, m, lo: int, hi: int) -> torch.Tensor:
        t = m.theta_rows(self._name, lo, hi)
        m.release(self._name)
        return t

    def task_zero(self, k: int) -> bool:
        """True when tau_k is zero here without reading: an adapter that does not touch the tensor."""
        m = self._models[k]
        return not self._ext and is_adapter(m) and not m.touched(self._name)

    def task_delta(self, k: int, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """tau_k rows for an adapter (float32; written into `out` when it can), None for a full
        fine-tune (the engine subtracts)."""
        if self._ext:
            return self._ext_delta(k, r0, r1)
        m = self._models[k]
        if not is_adapter(m):
            return None
        self.release()
        d = m.delta(self._name, self.shape, r0, r1, self._base, out=out)
        m.release(self._name)
        if m.touched(self._name):       # a saved tensor (tau = saved - base) read base rows
            self._base.release(self._name, r0, r1)
        return d
