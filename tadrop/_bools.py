"""Boolean masks from comparisons, masks as 0/1 floats, and counts of true entries.

Why a module: on the CPU, torch's kernels for a comparison with a bool result, for a bool ->
float copy and for count_nonzero run 3.6-5.2x slower than numpy's SIMD loops doing the same work
(`bench/kernels.md`, "Bool steps"), and the engine does such a step per task-element in
every method that keeps masks.  numpy views share the tensors' memory, so routing through it
changes no bit (a comparison has one answer; a Python scalar is compared as the tensor's dtype
in both libraries).  Off the CPU, torch's own ops run.
"""
from __future__ import annotations

import numpy as np
import torch

from . import native

_NP = {"gt": np.greater, "ge": np.greater_equal, "lt": np.less, "le": np.less_equal,
       "eq": np.equal}
_TORCH = {"gt": torch.gt, "ge": torch.ge, "lt": torch.lt, "le": torch.le, "eq": torch.eq}


def _cpu(*ts) -> bool:
    return all(t.device.type == "cpu" for t in ts)


def compare(x: torch.Tensor, op: str, other, out: torch.Tensor) -> torch.Tensor:
    """out (bool, x's shape) = x `op` other, op one of gt ge lt le eq; other a scalar or a tensor
    that broadcasts to x."""
    is_t = isinstance(other, torch.Tensor)
    if _cpu(x, out) and (not is_t or _cpu(other)):
        o = other.numpy() if is_t else np.asarray(other, dtype=x.numpy().dtype)
        _NP[op](x.numpy(), o, out=out.numpy())
        return out
    return _TORCH[op](x, other, out=out)


def as_float(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (float) = mask as 0.0 / 1.0 (the bytes as uint8: torch converts those at full speed)."""
    return out.copy_(mask.view(torch.uint8) if mask.dtype == torch.bool else mask)


def count(mask: torch.Tensor) -> int:
    """Number of true (nonzero) entries."""
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.numpy()))
    return int(torch.count_nonzero(mask))


def mask_counts(mask: torch.Tensor | np.ndarray) -> tuple[list[int], list[int]]:
    """(kept, hist) of a [K, ...] mask: kept[k] the true entries of row k, hist[c] the entries true
    in exactly c of the K rows (TALL's "catastrophic" c = 0, "selfish" c = 1).  One pass in C on the
    CPU; else blockwise through two small buffers (tensor-sized temporaries cost more in page
    faults than the counting)."""
    if isinstance(mask, torch.Tensor):
        if mask.device.type != "cpu":
            flat = mask.reshape(mask.shape[0], -1)   # no [K, n] temporary; one sync for each list
            kept = flat.sum(1, dtype=torch.int64).tolist()
            hist = torch.bincount(flat.sum(0, dtype=torch.int32), minlength=flat.shape[0] + 1)
            return [int(v) for v in kept], [int(v) for v in hist.tolist()]
        mask = mask.numpy()
    k = mask.shape[0]
    flat = np.ascontiguousarray(mask).reshape(k, -1)
    n = flat.shape[1]
    fast = native.mask_counts(flat) if flat.dtype == np.bool_ else None
    if fast is not None:
        return [int(v) for v in fast[0]], [int(v) for v in fast[1]]
    step = 1 << 16
    acc = np.empty(min(step, n), dtype=np.uint8 if k < 256 else np.uint16)
    hit = np.empty(acc.shape, dtype=bool)
    hist = [0] * (k + 1)
    for j in range(0, n, step):
        rows = flat[:, j:j + step].view(np.uint8)
        a, h = acc[:rows.shape[1]], hit[:rows.shape[1]]
        np.copyto(a, rows[0])
        for i in range(1, k):                 # row adds: no widening cast, unlike np.sum / bincount
            np.add(a, rows[i], out=a)
        for c in range(k):
            hist[c] += int(np.count_nonzero(np.equal(a, c, out=h)))
    hist[k] = n - sum(hist[:k])
    return [int(np.count_nonzero(flat[i])) for i in range(k)], hist


def and_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a &= b for bool tensors of one shape."""
    if _cpu(a, b):
        np.logical_and(a.numpy(), b.numpy(), out=a.numpy())
        return a
    return a.logical_and_(b)


def select(cond: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a where cond else out, for bool [K, m] a and out and a bool [m] condition shared by
    the K rows."""
    if _cpu(cond, a, out):
        np.copyto(out.numpy(), a.numpy(), where=cond.numpy()[None, :])
        return out
    return out.copy_(torch.where(cond, a, out))
