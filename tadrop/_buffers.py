"""Reusable scratch buffers and float64 reductions over float32 data.

Why: on the machines we run on, first touch of freshly allocated memory is far
slower than the arithmetic itself, so hot paths borrow named buffers that are
kept between calls (per thread, per device) instead of allocating.  And SPEC
asks for sums of many terms in float64: converting a whole tensor to float64
would double its memory, so the sums below convert fixed-size blocks into a
reused float64 buffer and reduce those.

A borrowed buffer is valid until the next `scratch` call with the same name in
the same thread; callers pick distinct names for buffers alive at the same time.
"""
from __future__ import annotations

import threading

import torch

_local = threading.local()

# Block length of the float64 reductions: large enough that the Python loop costs
# nothing, small enough (2 MiB of float64) to stay near the caches.
BLOCK = 1 << 18


def scratch(name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D tensor of `numel` elements (uninitialised), reused across calls."""
    device = torch.device(device)
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    key = (name, dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        pool[key] = None  # drop the old one before allocating the new one
        buf = pool[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return buf[:numel]


def release_scratch() -> None:
    """Frees every buffer this thread keeps (e.g. after the last tensor of a job)."""
    _local.pool = {}


def scratch_bytes() -> int:
    """Bytes this thread's scratch pool holds (for memory accounting in tests)."""
    pool = getattr(_local, "pool", None) or {}
    return sum(b.numel() * b.element_size() for b in pool.values() if b is not None)


def _blocks(n: int):
    for i in range(0, n, BLOCK):
        yield i, min(n, i + BLOCK)


def sumsq64(x: torch.Tensor) -> float:
    """sum(x**2) with exact float64 squares and float64 accumulation."""
    x = x.reshape(-1)
    acc = torch.zeros((), dtype=torch.float64, device=x.device)
    buf = scratch("f64.a", min(BLOCK, x.numel()), torch.float64, x.device)
    for i, j in _blocks(x.numel()):
        b = buf[: j - i]
        b.copy_(x[i:j])
        acc += torch.dot(b, b)
    return float(acc)


def sum_abs64(x: torch.Tensor) -> float:
    """sum(|x|) accumulated in float64."""
    x = x.reshape(-1)
    acc = torch.zeros((), dtype=torch.float64, device=x.device)
    buf = scratch("f64.a", min(BLOCK, x.numel()), torch.float64, x.device)
    for i, j in _blocks(x.numel()):
        b = buf[: j - i]
        b.copy_(x[i:j])
        acc += b.abs_().sum()
    return float(acc)


def row_sum_abs64(x: torch.Tensor) -> torch.Tensor:
    """Per-row sum(|x[k]|) of a [K, m] tensor, float64 [K]."""
    return torch.tensor([sum_abs64(x[k]) for k in range(x.shape[0])], dtype=torch.float64)


def masked_sums64(masks: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum over elements of masks[k] * v for each k, float64 [K] (masks bool [K, m], v [m])."""
    K, m = masks.shape
    acc = torch.zeros(K, dtype=torch.float64, device=v.device)
    blk = max(1, min(BLOCK // max(K, 1), m))
    vb = scratch("f64.a", blk, torch.float64, v.device)
    mb = scratch("f64.b", K * blk, torch.float64, v.device)
    for i in range(0, m, blk):
        j = min(m, i + blk)
        w = j - i
        vb[:w].copy_(v[i:j])
        mk = mb[: K * w].view(K, w)
        mk.copy_(masks[:, i:j])
        acc += torch.mv(mk, vb[:w])
    return acc.cpu()


def sum_tasks64(taus: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (float64 [m]) = sum over k of taus[k] (float32 [K, m]), added in task order."""
    K, m = taus.shape
    tmp = scratch("f64.a", min(BLOCK, m), torch.float64, taus.device)
    for i, j in _blocks(m):
        o = out[i:j]
        o.copy_(taus[0, i:j])
        t = tmp[: j - i]
        for k in range(1, K):
            t.copy_(taus[k, i:j])
            o.add_(t)
    return out
