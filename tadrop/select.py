"""Exact order statistics of |x| for one whole CPU tensor, by whichever exact method is faster here.

Three exact methods give the same answers bit for bit (the k-th smallest |x| is one
float32 of the data, and counts are counts):
  - radix selection on float32 bit patterns (quantile.AbsSelector): mergeable
    histograms, so it is the only choice when a tensor is read in row chunks or
    one task's statistics span the model (model scope);
  - numpy's partition (introselect; SIMD-sorted on CPUs numpy 2 has kernels for)
    on a copy of |x|: no merging, but on a whole tensor that fits it can be the
    faster, by a factor that changes from one CPU to the next;
  - native counting (NativeOrder, C kernels of native.py): the same two histograms as
    the radix method in two passes, no copy, indifferent to long runs of equal values
    (which slow a quickselect many-fold); only where the kernels are built.
Which one wins is a property of the machine and of the data, not of the code, so
`whole_method` decides it by measurement: once per process and query kind it times each on a
fixed 2^21-element sample, half Gaussian, half a bf16 fine-tune's task vector (interleaved,
best CPU time of three), a few tenths of a second.
TADROP_SELECT=radix|partition|native forces a method (tests, benchmarks).
"""
from __future__ import annotations

import bisect
import math
import os
import threading
import time

import numpy as np
import torch

from . import native
from ._buffers import CACHE_BLOCK, scratch
from .quantile import AbsSelector, NonFiniteError, linear_ranks, numpy_lerp

METHODS = ("radix", "partition", "native")
ENV = "TADROP_SELECT"
_CAL_N = 1 << 21
_BLOCK = CACHE_BLOCK  # passes over the data in cache-sized blocks (no tensor-sized temporaries)
_PROBE = 2048         # AbsOrder: sample size of the heavy-tie probe
_PROBE_MIN = 1 << 16  # segments at least this long are probed before a partition
_lock = threading.Lock()
_chosen: dict[str, str] = {}
_timings: dict[str, dict[str, float]] = {}


class AbsOrder:
    """Exact order statistics of |x| over one whole float32 CPU tensor, by partitioning a copy.

    Each `value(rank)` partitions only the segment between the nearest ranks already
    placed, so a few ranks cost little more than one.  NaN/Inf raise NonFiniteError.

    Heavy ties: task vectors of bf16 checkpoints hold few distinct values (differences of
    bf16 numbers; often a third or more exact zeros), and numpy's introselect slows down
    many-fold when the rank falls inside a long run of equal values.  So before partitioning
    a large segment, a 2048-element sample guesses the value at the rank; when that value is
    frequent in the sample, two counting passes (|x| < v, |x| == v) settle the rank without
    any partition if it lies in v's run.  A guess that misses only costs the counting.
    """

    def __init__(self, x: torch.Tensor, on_block=None):
        """on_block(piece): called with each cache-sized piece of x, in flat order, while it is in
        cache (a caller's other pass over the same data, e.g. a float64 sum of squares)."""
        x = x.reshape(-1)
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError("AbsOrder needs a float32 CPU tensor")
        self.n = x.numel()
        a = scratch("sel.abs", self.n, torch.float32, "cpu").numpy()
        src = x.numpy()
        for j in range(0, self.n, _BLOCK):     # the max reads each block while it is in cache
            blk = np.abs(src[j:j + _BLOCK], out=a[j:j + _BLOCK])
            if not math.isfinite(float(blk.max())):   # max propagates NaN
                raise NonFiniteError("non-finite value (NaN or Inf)")
            if on_block is not None:
                on_block(x[j:j + _BLOCK])
        self._a = a
        self._placed: list[int] = []          # ranks already in their sorted position
        self._runs: list[tuple[float, int, int]] = []   # (v, #|x| < v, #|x| == v), counted exactly

    def _run_of(self, rank: int) -> tuple[float, int, int] | None:
        for run in self._runs:
            if run[1] <= rank < run[1] + run[2]:
                return run
        return None

    def _probe(self, seg: np.ndarray, rel: int) -> None:
        """Counts the run of the value a sample of `seg` puts at relative rank `rel`, when the
        sample puts the rank inside that value's run: a heavy tie the partition would
        crawl through."""
        m = seg.size
        smp = np.sort(seg[np.random.default_rng(m).integers(0, m, _PROBE)])
        at = min(_PROBE - 1, rel * _PROBE // m)
        v = smp[at]
        q = rel / m     # the sample puts the rank inside v's run by one standard error
        margin = math.sqrt(_PROBE * q * (1.0 - q)) + 1
        first, last = np.searchsorted(smp, v, "left"), np.searchsorted(smp, v, "right")
        if not (first + margin <= at < last - margin):
            return
        a = self._a
        buf = scratch("sel.eq", min(_BLOCK, self.n), torch.bool, "cpu").numpy()
        lt = eq = 0
        for j in range(0, self.n, _BLOCK):
            blk = a[j:j + _BLOCK]
            b = buf[:blk.size]
            lt += int(np.count_nonzero(np.less(blk, v, out=b)))
            eq += int(np.count_nonzero(np.equal(blk, v, out=b)))
        self._runs.append((float(v), lt, eq))

    def value(self, rank: int) -> float:
        """Exact float32 value of the rank-th (0-based) smallest |x|."""
        rank = int(rank)
        if not 0 <= rank < self.n:
            raise IndexError(f"rank {rank} outside [0, {self.n})")
        a, placed = self._a, self._placed
        i = bisect.bisect_left(placed, rank)
        if i == len(placed) or placed[i] != rank:
            run = self._run_of(rank)
            if run is not None:
                return run[0]
            lo = placed[i - 1] + 1 if i else 0
            hi = placed[i] if i < len(placed) else self.n
            seg = a[lo:hi]
            if hi - lo >= _PROBE_MIN and lo < rank < hi - 1:
                self._probe(seg, rank - lo)
                run = self._run_of(rank)
                if run is not None:
                    return run[0]
            if rank == lo:                    # the segment's minimum: one pass, no partition
                j = int(seg.argmin())
                seg[0], seg[j] = seg[j], seg[0]
            elif rank == hi - 1:
                j = int(seg.argmax())
                seg[-1], seg[j] = seg[j], seg[-1]
            else:
                seg.partition(rank - lo)
            placed.insert(i, rank)
        return float(a[rank])

    def count_below(self, rank: int) -> int:
        """Number of elements with |x| strictly below the rank-th smallest |x|."""
        v = np.float32(self.value(rank))
        run = self._run_of(rank)
        if run is not None and rank not in self._placed:
            return run[1]
        a, placed = self._a, self._placed
        i = bisect.bisect_left(placed, rank)
        start = 0                              # everything left of a placed rank with a smaller value is < v
        for j in range(i - 1, -1, -1):
            if a[placed[j]] < v:
                start = placed[j] + 1
                break
        seg = a[start:rank]                    # all <= v; count those equal to v, block by block
        eq = scratch("sel.eq", min(_BLOCK, seg.size), torch.bool, "cpu").numpy()
        same = 0
        for j in range(0, seg.size, _BLOCK):
            blk = seg[j:j + _BLOCK]
            same += int(np.count_nonzero(np.equal(blk, v, out=eq[:blk.size])))
        return rank - same

    def quantile(self, p: float) -> float:
        """numpy 'linear' quantile of |x| (as AbsSelector.quantile)."""
        lo, hi, t = linear_ranks(self.n, p)
        return numpy_lerp(self.value(lo), self.value(hi), t)


class NativeOrder:
    """AbsOrder's answers (the same bits) by counting, in the C kernels (native.py): a histogram
    of the top 16 bits of |x|'s float32 patterns, then, for the buckets that hold the ranks asked,
    histograms of the low 16 bits.  Two passes over x, no copy of it, and heavy ties cost nothing
    extra.  `prepare(ranks)` settles several ranks' buckets in one pass over x."""

    def __init__(self, x: torch.Tensor, on_block=None):
        x = x.reshape(-1)
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError("NativeOrder needs a contiguous float32 CPU tensor")
        self.n, self._x = x.numel(), x
        got = native.abs_hist_hi(x)
        if got is None:
            raise RuntimeError("NativeOrder needs tadrop's native kernels")
        hist, bad = got
        if bad:
            raise NonFiniteError("non-finite value (NaN or Inf)")
        if on_block is not None:
            for j in range(0, self.n, _BLOCK):
                on_block(x[j:j + _BLOCK])
        self._cum = np.cumsum(hist)                  # elements in buckets <= b
        self._lo: dict[int, np.ndarray] = {}         # bucket -> low-bits histogram
        self._cum_lo: dict[int, np.ndarray] = {}     # its cumulative sums, when asked

    def _bucket(self, rank: int) -> int:
        return int(np.searchsorted(self._cum, rank, "right"))

    def _below(self, b: int) -> int:
        return int(self._cum[b - 1]) if b else 0

    def prepare(self, ranks, between: tuple[int, int] | None = None) -> None:
        """Counts the low bits of every bucket holding one of `ranks`, and of every bucket from
        the one holding between[0] to the one holding between[1] (one pass over x)."""
        want = {self._bucket(int(r)) for r in ranks if 0 <= int(r) < self.n}
        if between is not None and 0 <= between[0] <= between[1] < self.n:
            want.update(range(self._bucket(between[0]), self._bucket(between[1]) + 1))
        todo = sorted(want - set(self._lo))
        if todo:
            for b, h in zip(todo, native.abs_hist_lo(self._x, todo)):
                self._lo[b] = h
                self._cum_lo.pop(b, None)

    def _lo_cum(self, b: int) -> np.ndarray:
        c = self._cum_lo.get(b)
        if c is None:
            c = self._cum_lo[b] = np.cumsum(self._lo[b])
        return c

    def _place(self, rank: int) -> tuple[int, int]:
        """(bucket, low bits) of the rank-th smallest |x|."""
        rank = int(rank)
        if not 0 <= rank < self.n:
            raise IndexError(f"rank {rank} outside [0, {self.n})")
        b = self._bucket(rank)
        if b not in self._lo:
            self.prepare([rank])
        return b, int(np.searchsorted(self._lo_cum(b), rank - self._below(b), "right"))

    def value(self, rank: int) -> float:
        """Exact float32 value of the rank-th (0-based) smallest |x|."""
        b, lo = self._place(rank)
        return float(np.array([(b << 16) | lo], dtype=np.uint32).view(np.float32)[0])

    def count_below(self, rank: int) -> int:
        """Number of elements with |x| strictly below the rank-th smallest |x|."""
        b, lo = self._place(rank)
        return self._below(b) + (int(self._lo_cum(b)[lo - 1]) if lo else 0)

    def bucket_range(self, rank: int) -> tuple[float, float]:
        """Bounds [lo, hi] on the rank-th smallest |x| from the first histogram alone."""
        b = self._bucket(int(rank))
        v = np.array([b << 16, (b << 16) | 0xFFFF], dtype=np.uint32).view(np.float32)
        return float(v[0]), float(v[1])

    def quantile(self, p: float) -> float:
        """numpy 'linear' quantile of |x| (as AbsSelector.quantile)."""
        lo, hi, t = linear_ranks(self.n, p)
        self.prepare([lo, hi])
        return numpy_lerp(self.value(lo), self.value(hi), t)


# ---- choosing ----------------------------------------------------------------------

def _radix_query(x: torch.Tensor, kind: str) -> None:
    s = AbsSelector()
    s.add_hi(x)
    n = s.n
    if kind == "tadrop":   # two quantiles and a threshold below the median: one lo pass each
        s.select(s.quantile_ranks(0.5) + s.quantile_ranks(0.95))
        s.add_lo(x)
        s.quantile(0.5), s.quantile(0.95)
        r = n // 3
    else:
        r = n - n // 5
    s.select([r])
    if s.needs_lo:
        s.add_lo(x)
    s.count_below(r)


def _partition_query(x: torch.Tensor, kind: str) -> None:
    o = AbsOrder(x)
    n = o.n
    if kind == "tadrop":
        o.quantile(0.95), o.quantile(0.5)
        r = n // 3
    else:
        r = n - n // 5
    o.count_below(r)


def _native_query(x: torch.Tensor, kind: str) -> None:
    o = NativeOrder(x)
    n = o.n
    if kind == "tadrop":
        o.prepare(list(linear_ranks(n, 0.5)[:2]) + list(linear_ranks(n, 0.95)[:2]) + [n // 3])
        o.quantile(0.95), o.quantile(0.5)
        r = n // 3
    else:
        r = n - n // 5
    o.count_below(r)


def _samples() -> list[torch.Tensor]:
    """Half Gaussian (float32 checkpoints), half what a bf16 LLM fine-tune gives: weights of
    std 0.02 moved by ~1e-3, both rounded to bf16, so tau holds few distinct values (multiples
    of the weights' ulps) in long runs, and a third of the weights left as they were (exact
    zeros; 41% in the benchmark's embedding); each 2^20 elements."""
    g = torch.Generator().manual_seed(12345)
    half = _CAL_N // 2
    gauss = torch.randn(half, generator=g).mul_(1e-3)
    base = (torch.randn(half, generator=g) * 0.02).bfloat16()
    tied = (base.float() + torch.randn(half, generator=g) * 1e-3).bfloat16().float() - base.float()
    tied[torch.rand(half, generator=g) < 0.33] = 0.0
    return [gauss, tied]


def available_methods() -> tuple[str, ...]:
    return METHODS if native.available() else tuple(m for m in METHODS if m != "native")


def _calibrate(kind: str) -> str:
    """The method whose worst slowdown against the fastest, over the sample kinds, is least: a
    method that wins on Gaussian data by a hair but loses by half on a bf16 task vector is not
    taken (minimax of the per-kind ratios; near-ties go to the lower total)."""
    xs = _samples()
    # native counting does the radix method's two passes in C: where it is built, radix (torch ops)
    # is not timed (it never won here, bench/kernels.md), which halves the calibration's cost, paid
    # by every worker process
    methods = tuple(m for m in available_methods() if m != "radix" or not native.available())
    best = {(m, i): math.inf for m in methods for i in range(len(xs))}
    query = {"radix": _radix_query, "partition": _partition_query, "native": _native_query}
    for m in methods:                          # warm-up: scratch buffers, code paths
        for x in xs:
            query[m](x, kind)
    for _ in range(3):                         # interleaved, so a burst of load hits all alike
        for m in methods:
            for i, x in enumerate(xs):
                t0 = time.thread_time()
                query[m](x, kind)
                best[m, i] = min(best[m, i], time.thread_time() - t0)
    total = {m: sum(best[m, i] for i in range(len(xs))) for m in methods}
    _timings[kind] = {m: total[m] / _CAL_N * 1e9 for m in methods}
    fastest = [min(best[m, i] for m in methods) for i in range(len(xs))]
    worst = {m: max(best[m, i] / max(fastest[i], 1e-12) for i in range(len(xs))) for m in methods}
    # the sample fits the cache; a whole tensor larger than it sends a partition's passes to
    # memory, while counting streams it (bench/kernels.md: on 22.5 M-element tensors counting is
    # 1.7-2.7x faster than the partition, where the sample has them within 10% of each other, and
    # a merge worker's calibration, sharing the cores, swung to partition and ran 1.5x slower on
    # the benchmark's tensors): counting is taken unless the partition is 1.4x faster
    score = {m: worst[m] * (0.7 if m == "native" else 1.0) for m in methods}
    return min(methods, key=lambda m: (score[m], total[m]))


def whole_method(kind: str = "tadrop", device="cpu") -> str:
    """'radix', 'partition' or 'native' for a whole tensor on `device`; kind 'tadrop' (two
    quantiles and a threshold) or 'one' (a single rank, e.g. top-k)."""
    if torch.device(device).type != "cpu":
        return "radix"
    forced = os.environ.get(ENV, "auto").strip().lower()
    if forced in available_methods():
        return forced
    if forced == "native":
        raise ValueError(f"{ENV}=native: tadrop's native kernels are not built on this install "
                         "(a C compiler at install time builds them; see README)")
    if forced not in ("", "auto"):
        raise ValueError(f"{ENV}={forced!r}: expected auto|radix|partition|native")
    m = _chosen.get(kind)
    if m is None:
        with _lock:
            m = _chosen.get(kind)
            if m is None:
                m = _chosen[kind] = _calibrate(kind)
    return m


def calibration() -> dict:
    """What `whole_method` measured in this process: kind -> {method: CPU ns per element}, chosen."""
    return {k: {"ns_per_element": dict(v), "chosen": _chosen.get(k)} for k, v in _timings.items()}
