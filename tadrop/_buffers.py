"""Reusable scratch buffers and float64 reductions over float32 data.

Why: on the machines we run on, first touch of freshly allocated memory is far
slower than the arithmetic itself, so hot paths borrow named buffers that are
kept between calls (per thread, per device) instead of allocating.  And SPEC
asks for sums of many terms in float64, which must not depend on how a tensor
was cut into chunks (see Sum64).

A borrowed buffer is valid until the next `scratch` call with the same name in
the same thread; callers pick distinct names for buffers alive at the same time.
"""
from __future__ import annotations

import math
import threading

import torch

from . import native

_local = threading.local()

def _pool() -> dict:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
        _local.gen, _local.cap = 0, None
    return pool


def begin_scratch_generation(cap_bytes: int | None) -> None:
    """Starts a unit of work (one tensor) that should hold at most `cap_bytes` of scratch:
    when a new buffer would take the pool past the cap, buffers this unit has not
    used are dropped first.  Keeps reuse across tensors without letting buffers of
    different shapes of work pile up beyond a worker's memory budget."""
    _pool()
    _local.gen += 1
    _local.cap = cap_bytes


def scratch(name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D tensor of `numel` elements (uninitialised), reused across calls."""
    device = torch.device(device)
    pool = _pool()
    key = (name, dtype, device)
    entry = pool.get(key)
    if entry is None or entry[0].numel() < numel:
        pool.pop(key, None)             # drop the old one before allocating the new one
        need = max(numel, 1) * torch.empty((), dtype=dtype).element_size()
        if _local.cap is not None and scratch_bytes() + need > _local.cap:
            for k in [k for k, (_, g) in pool.items() if g != _local.gen]:
                del pool[k]             # views handed out earlier stay valid (refcounted)
        entry = (torch.empty(max(numel, 1), dtype=dtype, device=device), _local.gen)
        _local.allocated = getattr(_local, "allocated", 0) + need
    pool[key] = (entry[0], _local.gen)
    return entry[0][:numel]


def scratch_allocated() -> int:
    """Bytes of new scratch buffers this thread has allocated so far (reuse adds nothing)."""
    return getattr(_local, "allocated", 0)


def release_scratch() -> None:
    """Frees every buffer this thread keeps (e.g. after the last tensor of a job)."""
    _local.pool = {}
    _local.gen, _local.cap = 0, None


def scratch_bytes() -> int:
    """Bytes this thread's scratch pool holds."""
    return sum(b.numel() * b.element_size() for b, _ in _pool().values())


CACHE_BLOCK = 1 << 17       # elementwise passes over large tensors go in blocks this long (cache-resident)
SUM_BLOCK = 1 << 12          # float64 sums: fixed blocks of the flat index
_SUM_BATCH = 64              # blocks converted to float64 at a time (CPU: they stay in cache)
_DEVICE_BATCH_ELEMENTS = 1 << 24   # off the CPU: float64 elements a batch converts (128 MiB), so a
                                   # tensor takes a few kernel launches, not thousands


def _on_cpu(device) -> bool:
    return torch.device(device).type == "cpu"


def sum_batch(device, rows: int = 1) -> int:
    """Blocks of SUM_BLOCK converted at a time, per row of `rows`: cache-sized on the CPU; on a GPU
    as many as 128 MiB of float64 holds (each batch costs ~15 kernel launches, whatever its size).
    The bits do not depend on it: every block is summed on its own."""
    if _on_cpu(device):
        return max(1, _SUM_BATCH // max(rows, 1))
    return max(1, _DEVICE_BATCH_ELEMENTS // (SUM_BLOCK * max(rows, 1)))


def elementwise_step(device) -> int:
    """Elements per pass of a blockwise float64 loop (`sum_tasks64`, `f64_inplace`): cache-sized
    on the CPU, 2^24 elsewhere (a launch per block is what costs there)."""
    return 1 << 16 if _on_cpu(device) else _DEVICE_BATCH_ELEMENTS


def _block_sums(buf: torch.Tensor) -> torch.Tensor:
    """Row sums of a float64 [nb, SUM_BLOCK] buffer (consumed) by pairwise halving:
    row[:s] += row[s:2s] for s = SUM_BLOCK/2, ..., 1.  Elementwise adds only, so every device,
    and the C kernel (native.block_sums, the same additions), gives these bits; each row's
    depend on its values alone."""
    s = buf.shape[1] // 2
    while s >= 1:
        buf[:, :s] += buf[:, s:2 * s]
        s //= 2
    return buf[:, 0].clone()


def _fsum_parts(parts: list, tail: torch.Tensor, fill: int) -> float:
    """math.fsum of the block sums kept (Python floats on the CPU, device tensors elsewhere) and of
    the partial block in `tail` (its first `fill` values)."""
    if parts and not isinstance(parts[0], torch.Tensor):
        flat = list(parts)                  # CPU: already floats, no per-element loop
    else:                                   # device tensors: one copy to the host, one sync
        flat = torch.cat([p.reshape(-1) for p in parts]).tolist() if parts else []
    if fill:
        t = tail.clone().view(1, -1)
        t[0, fill:] = 0
        flat.extend(_block_sums(t).tolist())
    return math.fsum(flat)


class Sum64:
    """Float64 sum of f(x) over float32 pieces fed in flat order: f is x, |x|, x**2
    or x * w for a float64 weight w aligned with x.

    Why not `torch.sum(dtype=float64)`: that converts the whole input first, and
    its rounding depends on how the stream was cut.  Here the flat index space
    is cut in fixed blocks of SUM_BLOCK elements (a piece's ragged ends are
    carried over to the next piece), each block is converted to float64 (squares
    of float32 values are exact there) and summed on its own, and the block sums
    are added with math.fsum.  So a tensor gives the same bits whether it
    arrives whole or in row chunks of any size: streamed == whole, bit for bit.
    """

    def __init__(self, device="cpu", op: str = "sum"):
        if op not in ("sum", "abs", "square", "weighted"):
            raise ValueError(f"Sum64 op {op!r}")
        self.device, self.op = torch.device(device), op
        self._tail = torch.zeros(SUM_BLOCK, dtype=torch.float64, device=self.device)
        self._fill = 0
        # block sums: Python floats on the CPU (many small tensors kept across a tensor's chunks would
        # pin the C heap between the chunks' large temporaries, which then stays resident: EMR's
        # workers grew with the tensor size), device tensors elsewhere (no sync per batch)
        self._parts: list = []

    def _prep(self, dst: torch.Tensor, src: torch.Tensor, w) -> None:
        dst.copy_(src)
        if self.op == "abs":
            dst.abs_()
        elif self.op == "square":
            dst.mul_(dst)
        elif self.op == "weighted":
            dst.mul_(w)

    def add(self, x: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """Feeds the next piece (any shape, flattened); `w` only for op 'weighted'."""
        x = x.reshape(-1)
        if (w is None) != (self.op != "weighted"):
            raise ValueError("a weight goes with op 'weighted' only")
        ws = (lambda a, b: w[a:b]) if w is not None else (lambda a, b: None)
        n, i, B = x.numel(), 0, SUM_BLOCK
        if self._fill:
            take = min(B - self._fill, n)
            self._prep(self._tail[self._fill:self._fill + take], x[:take], ws(0, take))
            self._fill += take
            i = take
            if self._fill == B:
                self._keep(_block_sums(self._tail.view(1, B)).clone())
                self._tail.zero_()
                self._fill = 0
        nfull = (n - i) // B
        fast = None if w is not None or not nfull else native.block_sums(
            x[i:i + nfull * B].view(1, -1), nfull, B, self.op)
        if fast is not None:
            self._parts.extend(fast[0].tolist())
        elif nfull:
            batch = min(nfull, sum_batch(self.device))
            buf = scratch("sum64.buf", batch * B, torch.float64, self.device)
            for j in range(0, nfull, batch):
                nb = min(batch, nfull - j)
                a, b = i + j * B, i + (j + nb) * B
                blk = buf[: nb * B].view(nb, B)
                self._prep(blk, x[a:b].view(nb, B), None if w is None else w[a:b].view(nb, B))
                self._keep(_block_sums(blk))
        i += nfull * B
        if i < n:
            self._prep(self._tail[: n - i], x[i:], ws(i, n))
            self._fill = n - i

    def _keep(self, sums: torch.Tensor) -> None:
        if _on_cpu(sums.device):
            self._parts.extend(sums.tolist())
        else:
            self._parts.append(sums)

    def value(self) -> float:
        return _fsum_parts(self._parts, self._tail, self._fill)


class Sum64Rows:
    """K Sum64 streams ('sum' or 'abs') fed in lockstep with [K, m] pieces, one per row (EMR's
    per-task sums): the same blocks and the same bits as K separate Sum64, with one conversion and
    one block reduction per piece instead of K of each."""

    def __init__(self, K: int, device="cpu", op: str = "sum"):
        if op not in ("sum", "abs"):
            raise ValueError(f"Sum64Rows op {op!r}")
        self.K, self.device, self.op = K, torch.device(device), op
        self._tail = torch.zeros(K, SUM_BLOCK, dtype=torch.float64, device=self.device)
        self._fill = 0
        self._parts: list[list] = [[] for _ in range(K)]
        self._pending: list[torch.Tensor] = []    # off the CPU: [K, nb] block sums not yet fetched

    def _prep(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)
        if self.op == "abs":
            dst.abs_()

    def _keep(self, sums: torch.Tensor) -> None:       # [K, nb] block sums
        if _on_cpu(sums.device):
            for part, row in zip(self._parts, sums.tolist()):
                part.extend(row)
        else:
            self._pending.append(sums)               # fetched together (one sync) by `value`

    def _fetch(self) -> None:
        if self._pending:
            rows = torch.cat(self._pending, dim=1).tolist()
            self._pending = []
            for part, row in zip(self._parts, rows):
                part.extend(row)

    def add(self, x: torch.Tensor) -> None:
        """Feeds the next [K, m] piece (row k continues stream k)."""
        K, n = x.shape
        i, B = 0, SUM_BLOCK
        if self._fill:
            take = min(B - self._fill, n)
            self._prep(self._tail[:, self._fill:self._fill + take], x[:, :take])
            self._fill += take
            i = take
            if self._fill == B:
                self._keep(_block_sums(self._tail).view(K, 1))
                self._tail.zero_()
                self._fill = 0
        nfull = (n - i) // B
        fast = native.block_sums(x[:, i:i + nfull * B], nfull, B, self.op) if nfull and K else None
        if fast is not None:
            for part, row in zip(self._parts, fast.tolist()):
                part.extend(row)
        elif nfull:
            batch = min(nfull, sum_batch(self.device, K))
            buf = scratch("sum64r.buf", K * batch * B, torch.float64, self.device)
            for j in range(0, nfull, batch):
                nb = min(batch, nfull - j)
                a, b = i + j * B, i + (j + nb) * B
                blk = buf[: K * nb * B].view(K, nb, B)
                self._prep(blk, x[:, a:b].view(K, nb, B))
                self._keep(_block_sums(blk.view(K * nb, B)).view(K, nb))
        i += nfull * B
        if i < n:
            self._prep(self._tail[:, : n - i], x[:, i:])
            self._fill = n - i

    def head(self, n: int) -> int:
        """How many of the next n elements complete the block now partly filled (0 when none is):
        after them, whole blocks can come as sums (`extend`)."""
        return min(n, (SUM_BLOCK - self._fill) % SUM_BLOCK)

    def extend(self, sums) -> None:
        """Takes the sums of whole blocks computed elsewhere in this class's order (the fused EMR
        kernel: numpy float64 [K, nb]), at a block boundary."""
        if self._fill:
            raise ValueError("Sum64Rows.extend inside a partly filled block")
        self._fetch()                                # keep the blocks in order
        for part, row in zip(self._parts, sums.tolist()):
            part.extend(row)

    def value(self, k: int) -> float:
        self._fetch()
        return _fsum_parts(self._parts[k], self._tail[k], self._fill)


def sumsq64(x: torch.Tensor) -> float:
    """sum(x**2) in float64, chunking-invariant (see Sum64)."""
    s = Sum64(x.device, "square")
    s.add(x)
    return s.value()


def sum_abs64(x: torch.Tensor) -> float:
    """sum(|x|) in float64, chunking-invariant (see Sum64)."""
    s = Sum64(x.device, "abs")
    s.add(x)
    return s.value()


def sum_tasks64(taus: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (float64 [m]) = sum over k of taus[k] (float32 [K, m]), added in task order."""
    K, m = taus.shape
    step = elementwise_step(taus.device)
    tmp = scratch("f64.tmp", min(step, m), torch.float64, taus.device)
    for i in range(0, m, step):
        j = min(m, i + step)
        o = out[i:j]
        o.copy_(taus[0, i:j])
        t = tmp[: j - i]
        for k in range(1, K):
            t.copy_(taus[k, i:j])
            o.add_(t)
    return out


def f64_inplace(dst: torch.Tensor, src: torch.Tensor, op: str) -> torch.Tensor:
    """dst (float64) op= src (float32), converting src block by block: torch's
    mixed-dtype elementwise path is an order of magnitude slower than a cast + op."""
    step = elementwise_step(dst.device)
    tmp = scratch("f64.tmp", min(step, dst.numel()), torch.float64, dst.device)
    for i in range(0, dst.numel(), step):
        j = min(dst.numel(), i + step)
        t = tmp[: j - i]
        t.copy_(src[i:j])
        getattr(dst[i:j], op + "_")(t)
    return dst


def sumsq64_pair(x: torch.Tensor, t: float | None) -> tuple[float, float]:
    """(sum x**2, sum of x**2 over |x| >= t) in one pass, with the bits of `sumsq64(x)` and of
    `sumsq64` over x with the entries |x| < t zeroed (TADrop's ||tau||^2 and ||tau_hat||^2).

    Each block's float64 squares are summed, then the squares below t**2 are zeroed in place and
    the block summed again: x**2 and t**2 are exact in float64 (t a float32), so x**2 < t**2
    exactly when |x| < t, and the second sums see the same numbers, in the same blocks, as a
    separate pass over the dropped tensor would.  t None: the second sum is not computed (0.0).
    """
    x = x.reshape(-1)
    n, B = x.numel(), SUM_BLOCK
    lam = math.nextafter(float(t) * float(t), -math.inf) if t is not None else None
    every: list = []
    kept: list = []
    on_cpu = _on_cpu(x.device)

    def sums(blk: torch.Tensor) -> None:       # blk: float64 [nb, B] squares (consumed)
        if lam is not None:                    # zeroes v <= lam, i.e. v < t**2
            kb = scratch("sum64.kept", blk.numel(), torch.float64, blk.device).view_as(blk)
            keep(kept, _block_sums(torch.ops.aten.hardshrink.out(blk, lam, out=kb)))
        keep(every, _block_sums(blk))

    def keep(acc: list, block_sums: torch.Tensor) -> None:
        if on_cpu:
            acc.extend(block_sums.tolist())
        else:
            acc.append(block_sums)              # fetched once, below

    nfull = n // B
    fast = native.block_sums(x[:nfull * B].view(1, -1), nfull, B, "square", lam) if nfull else None
    if fast is not None:
        every.extend((fast[0] if lam is not None else fast)[0].tolist())
        if lam is not None:
            kept.extend(fast[1][0].tolist())
    elif nfull:
        batch = min(nfull, sum_batch(x.device))
        buf = scratch("sum64.buf", batch * B, torch.float64, x.device)
        for j in range(0, nfull, batch):
            nb = min(batch, nfull - j)
            blk = buf[: nb * B].view(nb, B)
            blk.copy_(x[j * B:(j + nb) * B].view(nb, B))
            sums(blk.mul_(blk))
    if n % B:
        tail = torch.zeros(1, B, dtype=torch.float64, device=x.device)
        tail[0, : n % B].copy_(x[nfull * B:])
        sums(tail.mul_(tail))
    if not on_cpu:                              # device tensors: one copy to the host each
        every = torch.cat(every).tolist() if every else []
        kept = torch.cat(kept).tolist() if kept else []
    return math.fsum(every), (math.fsum(kept) if lam is not None else 0.0)
