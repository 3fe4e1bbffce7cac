"""Exact order statistics of |x| by two-level radix selection on float32 bits.

For a finite float32 x, `bits(x) & 0x7FFFFFFF` (the bit pattern of |x| read as
an int32) is monotone in |x|.  So the k-th smallest |x| is found exactly by
  1. a histogram of the high 16 bits (sign cleared: 32768 buckets), which names
     the bucket holding rank k, then
  2. a histogram of the full bit patterns inside the selected bucket(s).
Both histograms are sums over the data, so they merge: the same `AbsSelector`
serves a whole tensor, a tensor read in row chunks, and one task's statistics
over all tensors of a model (model scope).  No sort, no copy of the data, and no
2^24-element limit (torch.quantile's).

Quantiles follow numpy's default 'linear' method bit for bit: the result equals
`np.quantile(np.abs(x_f32), p)` for a Python float p (an np.float32), returned
as a Python float holding that float32 value.
"""
from __future__ import annotations

import math
import struct
import threading
from typing import Iterable, Sequence

import numpy as np
import torch

from . import native

from ._buffers import scratch

HI_BINS = 1 << 15            # high 16 bits of |x|'s pattern: sign cleared
NONFINITE_BUCKET = 0x7F80    # buckets >= this hold +-Inf and NaN
_SMALL_SELECTION = 1 << 12   # at most this many selected values: sort them
_DENSE_BUCKETS = 64          # else histogram densely when at most this many buckets are pending

_local = threading.local()   # identifies the last writer of the shared code buffer


class NonFiniteError(ValueError):
    """A NaN or Inf was met; callers add the tensor and task names to the message."""


def _flat_f32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        x = x.float()
    return x.reshape(-1)


def bits_to_float(b: int) -> float:
    """The float32 whose bit pattern is the int32 `b`, as a Python float."""
    return struct.unpack("<f", struct.pack("<I", int(b) & 0xFFFFFFFF))[0]


def float_to_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def prev_float32(v: float) -> float:
    """Largest float32 below the non-negative float32 v (0 stays 0)."""
    b = float_to_bits(v)
    return 0.0 if b == 0 else bits_to_float(b - 1)


def linear_ranks(n: int, p: float) -> tuple[int, int, float]:
    """numpy 'linear' (Hyndman-Fan 7) on n sorted values: (lower rank, upper rank, gamma).

    Mirrors numpy 2.x `_quantile` for a Python-float q exactly: virtual index
    (n-1)*q in float64; at or past the last index both ranks are the maximum and
    gamma is computed against numpy's index -1 (it does not matter then, a == b).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"quantile {p} outside [0, 1]")
    vi = (n - 1) * float(p)
    prev = math.floor(vi)
    if vi >= n - 1:
        return n - 1, n - 1, vi - (-1)
    return prev, prev + 1, vi - prev


def numpy_lerp(a: float, b: float, t: float) -> float:
    """numpy's `_lerp` on float32 operands and a Python-float weight (weak promotion)."""
    a32, b32 = np.float32(a), np.float32(b)
    diff = b32 - a32
    if t >= 0.5:
        r = b32 - diff * (1 - t)
    else:
        r = a32 + diff * t
    return float(np.float32(r))


def _next_epoch() -> int:
    e = getattr(_local, "epoch", 0) + 1
    _local.epoch = e
    return e


def _native_hi(x: torch.Tensor) -> torch.Tensor | None:
    """The hi histogram of a piece by the C kernel (native.py), None where it cannot run.  A
    non-finite value is reported in NONFINITE_BUCKET, as the torch path would."""
    got = native.abs_hist_hi(x)
    if got is None:
        return None
    h, bad = got
    if bad:
        h[NONFINITE_BUCKET] += 1
    return torch.from_numpy(h)


def _native_lo(x: torch.Tensor, pending: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(sorted distinct bit patterns, counts) of the piece's values in the pending buckets by the
    C kernel (the torch path's `_sparse_hist` answer), None where it cannot run."""
    if not pending or len(pending) > _DENSE_BUCKETS:     # one pass per 16 buckets: many go the torch way
        return None
    h = native.abs_hist_lo(x, pending)
    if h is None:
        return None
    h = h.reshape(-1)
    nz = np.flatnonzero(h)
    return (np.asarray(pending, np.int64)[nz >> 16] << 16) | (nz & 0xFFFF), h[nz]


class AbsSelector:
    """Exact order statistics of |x| over data fed in pieces (mergeable).

    Protocol: `add_hi` every piece; `merge` partial selectors; `select(ranks)`;
    while `needs_lo`, `add_lo` every piece again (same data, any order/chunking);
    then `value(rank)` / `quantile(p)`.  Asking for ranks in new buckets needs
    another `add_lo` round.  NaN/Inf raise `NonFiniteError` in `add_hi`.
    """

    def __init__(self) -> None:
        self.n = 0
        self._hi: torch.Tensor | None = None      # int64 [HI_BINS], data's device
        self._cum: np.ndarray | None = None       # cumulative hi counts (after select)
        self._pending: set[int] = set()           # buckets whose lo pass is due / running
        self._resolved: set[int] = set()          # buckets with complete lo counts
        self._lo_open = False                     # add_lo called since the last select
        self._lo_pieces: list[tuple[np.ndarray, np.ndarray]] = []
        self._lo: tuple[np.ndarray, np.ndarray] | None = None  # consolidated (bits, counts)
        self._lut: dict = {}
        self._codes_tag = None

    # ---- pass 1 -------------------------------------------------------------
    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """High 16 bits of |x|'s pattern as int32, in the shared buffer."""
        codes = scratch("sel.codes", x.numel(), torch.int32, x.device)
        torch.bitwise_right_shift(x.view(torch.int32), 16, out=codes)
        codes.bitwise_and_(0x7FFF)
        self._codes_tag = (x.data_ptr(), x.numel(), x._version, x.device, _next_epoch())
        return codes

    def add_hi(self, x: torch.Tensor) -> None:
        if self._cum is not None:
            raise RuntimeError("add_hi after select: start a new AbsSelector")
        x = _flat_f32(x)
        if x.numel() == 0:
            return
        h = _native_hi(x)
        if h is None:
            h = torch.bincount(self._codes(x), minlength=HI_BINS)
        if bool(h[NONFINITE_BUCKET:].any()):
            raise NonFiniteError("non-finite value (NaN or Inf)")
        if self._hi is None:
            self._hi = h
        else:
            if self._hi.device != h.device:
                self._hi, h = self._hi.cpu(), h.cpu()
            self._hi += h
        self.n += x.numel()

    def merge(self, other: "AbsSelector") -> None:
        """Adds other's counts: hi histograms before `select`, lo counts after."""
        if other.n and (self._cum is not None or other._cum is not None):
            raise RuntimeError("merge hi histograms before select")
        if other._hi is not None:
            oh = other._hi.cpu()
            self._hi = oh.clone() if self._hi is None else self._hi.cpu() + oh
        self.n += other.n
        if other._lo_pieces or other._lo is not None:
            new = (other._pending | other._resolved) - self._resolved
            if new:
                self._pending |= new
                self._lo_open = True
            self._lo_pieces.append(other._lo_table())
            self._lo = None

    def merge_lo(self, part: "AbsSelector") -> None:
        """Adds a lo part (from `lo_part` + `add_lo`, model scope): same as `merge`."""
        self.merge(part)

    # ---- selection ----------------------------------------------------------
    def _cumsum(self) -> np.ndarray:
        if self._cum is None:
            hist = np.zeros(HI_BINS, np.int64) if self._hi is None else self._hi.cpu().numpy()
            self._cum = np.cumsum(hist)
        return self._cum

    def bucket_of(self, rank: int) -> tuple[int, int]:
        """(bucket of the rank, number of elements in lower buckets)."""
        rank = int(rank)
        if not 0 <= rank < self.n:
            raise IndexError(f"rank {rank} outside [0, {self.n})")
        cum = self._cumsum()
        b = int(np.searchsorted(cum, rank, side="right"))
        return b, int(cum[b - 1]) if b else 0

    def bucket_count(self, b: int) -> int:
        cum = self._cumsum()
        return int(cum[b] - (cum[b - 1] if b else 0))

    def select(self, ranks: Sequence[int]) -> None:
        """Marks the buckets holding these 0-based ranks for the next lo pass."""
        self._close_lo()
        for r in ranks:
            self.select_buckets([self.bucket_of(r)[0]])

    def select_buckets(self, buckets: Iterable[int]) -> None:
        self._close_lo()
        self._cumsum()
        for b in buckets:
            if int(b) not in self._resolved:
                self._pending.add(int(b))
                self._lut.clear()

    @property
    def needs_lo(self) -> bool:
        return bool(self._pending) and not self._lo_open

    def lo_part(self, ranks: Sequence[int]) -> "AbsSelector":
        """An empty selector that collects lo counts for the buckets of `ranks`
        not resolved here (model scope: one part per tensor, merged back).  Does
        not close a lo round this selector is collecting by merges."""
        s = AbsSelector()
        s._cum = np.zeros(0, np.int64)   # marks it as past select: no hi counts
        s._pending = {self.bucket_of(r)[0] for r in ranks} - self._resolved
        return s

    # ---- pass 2 -------------------------------------------------------------
    def add_lo(self, x: torch.Tensor) -> None:
        x = _flat_f32(x)
        if not self._pending:
            return
        self._lo_open = True
        if x.numel() == 0:
            return
        piece = _native_lo(x, sorted(self._pending))
        if piece is not None:
            if piece[0].size:
                self._lo_pieces.append(piece)
                self._lo = None
            return
        tag = self._codes_tag
        if tag is not None and tag[:4] == (x.data_ptr(), x.numel(), x._version, x.device) \
                and tag[4] == getattr(_local, "epoch", 0):
            codes = scratch("sel.codes", x.numel(), torch.int32, x.device)  # still ours
        else:
            codes = self._codes(x)
        lut = self._lut.get(x.device)
        if lut is None:
            lut = torch.zeros(HI_BINS, dtype=torch.bool)
            lut[sorted(self._pending)] = True
            lut = self._lut[x.device] = lut.to(x.device)
        mask = scratch("sel.mask", x.numel(), torch.bool, x.device)
        torch.index_select(lut, 0, codes, out=mask)
        if x.device.type == "cpu":   # numpy's compress: 2-6x faster than torch's nonzero + gather here
            sel = torch.from_numpy(np.compress(mask.numpy(), x.view(torch.int32).numpy()))
        else:                         # nonzero + gather beats boolean indexing (one pass over the mask)
            sel = x.view(torch.int32).index_select(0, torch.nonzero(mask).squeeze(1))
        if sel.numel():
            self._lo_pieces.append(self._sparse_hist(sel.bitwise_and_(0x7FFFFFFF)))
            self._lo = None

    def _sparse_hist(self, sel: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct bit patterns, their counts) of the selected values.

        Few values: sort them.  Many: one dense histogram over the pending buckets
        (slot of the bucket << 16 | low 16 bits), far cheaper than a sort."""
        pending = sorted(self._pending)
        if sel.numel() <= _SMALL_SELECTION or len(pending) > _DENSE_BUCKETS:
            v, c = torch.unique(sel, sorted=True, return_counts=True)
            return v.cpu().numpy().astype(np.int64), c.cpu().numpy().astype(np.int64)
        slots = torch.zeros(HI_BINS, dtype=torch.int32)
        slots[pending] = torch.arange(len(pending), dtype=torch.int32)
        slot = torch.index_select(slots.to(sel.device), 0, sel >> 16)
        key = (slot << 16).bitwise_or_(sel.bitwise_and(0xFFFF))
        h = torch.bincount(key, minlength=len(pending) << 16).cpu().numpy()
        nz = np.flatnonzero(h)
        vals = (np.asarray(pending, np.int64)[nz >> 16] << 16) | (nz & 0xFFFF)
        return vals, h[nz].astype(np.int64)

    def _close_lo(self) -> None:
        if self._lo_open:
            self._resolved |= self._pending
            self._pending = set()
            self._lo_open = False
            self._lut.clear()

    def _lo_table(self) -> tuple[np.ndarray, np.ndarray]:
        if self._lo is None:
            pieces = self._lo_pieces
            if not pieces:
                self._lo = (np.zeros(0, np.int64), np.zeros(0, np.int64))
            elif len(pieces) == 1:
                self._lo = pieces[0]
            else:
                v = np.concatenate([p[0] for p in pieces])
                c = np.concatenate([p[1] for p in pieces])
                u, inv = np.unique(v, return_inverse=True)
                cnt = np.zeros(len(u), np.int64)
                np.add.at(cnt, inv, c)
                self._lo = (u, cnt)
            self._lo_pieces = [self._lo]
        return self._lo

    # ---- answers ------------------------------------------------------------
    def _locate(self, rank: int) -> tuple[int, int]:
        """(bit pattern of the rank-th smallest |x|, count of elements strictly below it)."""
        self._close_lo()
        b, below = self.bucket_of(rank)
        if b not in self._resolved:
            raise RuntimeError(f"rank {rank} is in bucket {b}, which has no lo counts: "
                               "select() it and run add_lo over the data first")
        vals, cnts = self._lo_table()
        i0 = int(np.searchsorted(vals, b << 16))
        i1 = int(np.searchsorted(vals, (b + 1) << 16))
        cs = np.cumsum(cnts[i0:i1])
        if not len(cs) or cs[-1] != self.bucket_count(b):
            raise RuntimeError("lo pass saw different data than the hi pass")
        j = int(np.searchsorted(cs, rank - below, side="right"))
        return int(vals[i0 + j]), below + (int(cs[j - 1]) if j else 0)

    def value(self, rank: int) -> float:
        """Exact float32 value of the rank-th (0-based) smallest |x|."""
        return bits_to_float(self._locate(rank)[0])

    def count_below(self, rank: int) -> int:
        """Number of elements with |x| strictly below the rank-th smallest |x|."""
        return self._locate(rank)[1]

    def quantile_ranks(self, p: float) -> list[int]:
        lo, hi, _ = linear_ranks(self.n, p)
        return [lo, hi]

    def quantile(self, p: float) -> float:
        """numpy 'linear' quantile of |x| (ranks from `quantile_ranks` must be resolved)."""
        lo, hi, t = linear_ranks(self.n, p)
        return numpy_lerp(self.value(lo), self.value(hi), t)

    def bucket_bounds(self, b: int) -> tuple[float, float]:
        """Smallest and largest float32 a bucket can hold."""
        return bits_to_float(b << 16), bits_to_float(((b + 1) << 16) - 1)

    # ---- shipping -----------------------------------------------------------
    def to_numpy(self) -> dict:
        hist = np.zeros(HI_BINS, np.int64) if self._hi is None else self._hi.cpu().numpy()
        idx = np.flatnonzero(hist)
        vals, cnts = self._lo_table()
        return {
            "n": int(self.n), "hi_idx": idx.astype(np.int32), "hi_cnt": hist[idx].astype(np.int64),
            "selected": self._cum is not None, "lo_open": bool(self._lo_open),
            "pending": np.array(sorted(self._pending), np.int64),
            "resolved": np.array(sorted(self._resolved), np.int64),
            "lo_vals": vals, "lo_cnts": cnts,
        }

    @classmethod
    def from_numpy(cls, d: dict) -> "AbsSelector":
        s = cls()
        s.n = int(d["n"])
        if len(d["hi_idx"]) or s.n:
            hist = np.zeros(HI_BINS, np.int64)
            hist[np.asarray(d["hi_idx"], np.int64)] = d["hi_cnt"]
            s._hi = torch.from_numpy(hist)
        if bool(d["selected"]):
            s._cumsum()
        s._pending = {int(b) for b in d["pending"]}
        s._resolved = {int(b) for b in d["resolved"]}
        s._lo_open = bool(d["lo_open"])
        if len(d["lo_vals"]):
            s._lo = (np.asarray(d["lo_vals"], np.int64), np.asarray(d["lo_cnts"], np.int64))
            s._lo_pieces = [s._lo]
        return s


def _whole(x: torch.Tensor, ranks: Sequence[int]) -> AbsSelector:
    s = AbsSelector()
    s.add_hi(x)
    s.select(ranks)
    if s.needs_lo:
        s.add_lo(x)
    return s


def kth_smallest_abs(x: torch.Tensor, k: int) -> float:
    """The k-th smallest |x| (1-based, as torch.kthvalue), exact float32 as a Python float."""
    x = _flat_f32(x)
    if not 1 <= k <= x.numel():
        raise IndexError(f"k={k} outside [1, {x.numel()}]")
    return _whole(x, [k - 1]).value(k - 1)


def abs_quantiles(x: torch.Tensor, ps: Sequence[float]) -> list[float]:
    """[float(np.quantile(np.abs(x), p)) for p in ps], computed without sorting."""
    x = _flat_f32(x)
    if x.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    n = x.numel()
    ranks = [r for p in ps for r in linear_ranks(n, p)[:2]]
    s = _whole(x, ranks)
    return [s.quantile(p) for p in ps]
