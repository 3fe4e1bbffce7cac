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


def count_rows(mask: torch.Tensor) -> list[int]:
    """Per row of a [K, m] mask: the number of true entries."""
    if mask.device.type == "cpu":
        m = mask.numpy()
        return [int(np.count_nonzero(m[k])) for k in range(m.shape[0])]
    return [int(torch.count_nonzero(mask[k])) for k in range(mask.shape[0])]


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
