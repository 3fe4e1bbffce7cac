"""The operator Phi applied to each task vector before merging (SPEC section 1).

Each sparsifier is a frozen dataclass with three entry points:
  - `fit(tau)` on a whole tensor, or `fit_streamed(chunks, numel)` over row
    chunks (`chunks()` is called once per pass and yields the float32 pieces in
    flat order; they give identical thresholds and kept counts),
  - `apply(tau, stats, key)`: elementwise, in place on a float32 chunk whose
    first element has flat index `key.offset`.
`global_value` (scope 'model') replaces the per-tensor statistic by the task's
model-wide one: TADrop's drop rate d, TopK's magnitude threshold; TADrop's
scope 'global_threshold' gets the pair (model-wide d, model-wide threshold).
`keep_entries` and `rescale_factor` split Phi into its two parts (which entries
survive, and the factor they are multiplied by) for EMR's `mask` integration.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch

from . import _bools as B
from . import native
from ._buffers import CACHE_BLOCK, Sum64, scratch, sumsq64, sumsq64_pair
from .quantile import AbsSelector, NonFiniteError, linear_ranks, prev_float32
from .select import AbsOrder, NativeOrder, whole_method

Chunks = Callable[[], Iterable[torch.Tensor]]


@dataclass(frozen=True)
class SparsifyStats:
    """What a fit found for one (tensor, task); None where a sparsifier has no such figure.

    drop_rate: TADrop's d; TopK's realised fraction dropped; DARE's p.
    k: entries the rule asks to drop; threshold: keep |tau| >= threshold.
    kept: entries kept (|tau| >= threshold; ties at the boundary are kept).
    norm_before = ||tau||_2, norm_after = ||Phi(tau)||_2 = scale * ||tau_hat||_2.
    """
    numel: int
    q_a: float | None = None
    q_b: float | None = None
    drop_rate: float | None = None
    k: int | None = None
    threshold: float | None = None
    norm_before: float | None = None
    norm_after: float | None = None
    scale: float | None = None
    kept: int | None = None


@dataclass(frozen=True)
class ChunkKey:
    """Identifies a chunk for seeded sparsifiers: offset = flat index of its first element."""
    seed: int = 0
    tensor: str = ""
    task: str = ""
    offset: int = 0


def _flat(c: torch.Tensor) -> torch.Tensor:
    return (c if c.dtype == torch.float32 else c.float()).reshape(-1)


def _shrink(src: torch.Tensor, t: float, out: torch.Tensor) -> torch.Tensor:
    """out = src where |src| >= t else 0, for a float32 threshold t > 0.

    hardshrink zeroes |x| <= lambd; with lambd the float32 just below t that is
    exactly |x| < t.  One fused pass, and it writes into `out` (may be `src`).
    """
    return torch.ops.aten.hardshrink.out(src, prev_float32(t), out=out)


class Sparsifier:
    """Base: Phi = identity on everything; subclasses override what they change."""
    needs_fit: ClassVar[bool] = False
    scope: str = "tensor"

    def fit(self, tau: torch.Tensor, *, global_value: float | None = None) -> SparsifyStats:
        return self.fit_streamed(lambda: (tau,), tau.numel(), global_value=global_value)

    def fit_streamed(self, chunks: Chunks, numel: int, *,
                     global_value: float | None = None) -> SparsifyStats:
        return SparsifyStats(numel=numel)

    def apply(self, tau: torch.Tensor, stats: SparsifyStats, key: ChunkKey) -> torch.Tensor:
        return tau

    def fit_apply_(self, tau: torch.Tensor, key: ChunkKey, *,
                   global_value: float | None = None) -> SparsifyStats:
        """fit + apply on a whole float32 tensor, in place (subclasses fuse the passes)."""
        stats = self.fit(tau, global_value=global_value)
        self.apply(tau, stats, key)
        return stats

    def keep_entries(self, tau: torch.Tensor, stats: SparsifyStats, out: torch.Tensor) -> torch.Tensor:
        """bool, shaped like `out` (numel of tau): the entries Phi keeps (before any rescale)."""
        raise ValueError(f"{type(self).__name__} has no keep mask")

    def elementwise(self, stats: SparsifyStats) -> tuple[float, float] | None:
        """(lam, scale) when `apply` is exactly x -> (|x| <= lam ? +0 : x) * scale in float32
        (lam < 0: nothing zeroed, inf: everything), so a combine kernel can run it in its own
        pass; None when it is not (DARE's random drop).  The base class applies nothing."""
        return (-1.0, 1.0) if type(self).apply is Sparsifier.apply else None

    def rescale_factor(self, stats: SparsifyStats) -> float:
        """The factor Phi multiplies the kept entries by (1 where it does not rescale)."""
        raise ValueError(f"{type(self).__name__} has no keep mask")

    # model scope: which ranks of the task's model-wide |tau| are needed, and the value
    def model_ranks(self, n: int) -> list[int]:
        raise ValueError(f"{type(self).__name__} has no model scope")

    def model_lo_ranks(self, sel: AbsSelector) -> list[int]:
        """Ranks whose buckets the first model-wide lo pass resolves (`sel`: merged hi counts)."""
        return self.model_ranks(sel.n)

    def model_extra_ranks(self, sel: AbsSelector) -> list[int]:
        """After the first lo pass (values of `model_lo_ranks` resolved): ranks still
        needed whose buckets are unresolved (a further lo pass); none by default."""
        return []

    def model_value(self, sel: AbsSelector) -> float:
        raise ValueError(f"{type(self).__name__} has no model scope")


@dataclass(frozen=True)
class Identity(Sparsifier):
    """Phi(tau) = tau."""

    def keep_entries(self, tau, stats, out):
        return out.fill_(True)

    def rescale_factor(self, stats):
        return 1.0


def _lo_pass(sel: AbsSelector, chunks: Chunks) -> None:
    if sel.needs_lo:
        for c in chunks():
            sel.add_lo(_flat(c))


def _count_at_least(c: torch.Tensor, t: float) -> int:
    """#{|c| >= t} for a float32 threshold t (0 counts everything, inf nothing)."""
    if t <= 0:
        return c.numel()
    a = torch.abs(c, out=scratch("phi.f32", c.numel(), torch.float32, c.device))
    return B.count(B.compare(a, "ge", t, scratch("phi.bool", c.numel(), torch.bool, c.device)))




def _sumsq_kept(flat: torch.Tensor, t: float) -> float:
    """||tau_hat||^2 = sum over |x| >= t of x^2 (float64, chunking-invariant like sumsq64), one
    pass over `flat` in cache-sized blocks: no tensor-sized temporary, `flat` left as it is."""
    acc = Sum64(flat.device, "square")
    step = CACHE_BLOCK if flat.device.type == "cpu" else max(flat.numel(), 1)
    buf = scratch("phi.f32", min(step, flat.numel()), torch.float32, flat.device)
    for j in range(0, flat.numel(), step):
        blk = flat[j:j + step]
        acc.add(_shrink(blk, t, buf[:blk.numel()]))
    return acc.value()


def _keep_at_least(tau: torch.Tensor, stats: SparsifyStats, out: torch.Tensor) -> torch.Tensor:
    """out = |tau| >= stats.threshold (all when nothing is dropped, none when all is)."""
    flat, o = tau.reshape(-1), out.view(-1)
    if stats.kept == 0:
        return o.zero_().view(out.shape)
    if stats.kept == stats.numel or not stats.threshold > 0:
        return o.fill_(True).view(out.shape)
    B.compare(torch.abs(flat, out=scratch("phi.f32", flat.numel(), torch.float32, flat.device)),
              "ge", stats.threshold, o)
    return out


def _threshold(sel: AbsSelector, chunks: Chunks, rank: int) -> tuple[float, int]:
    """(rank-th smallest |tau|, number of entries >= it)."""
    sel.select([rank])
    _lo_pass(sel, chunks)
    return sel.value(rank), sel.n - sel.count_below(rank)


@dataclass(frozen=True)
class TADrop(Sparsifier):
    """TADrop ("One Size Does Not Fit All", arXiv 2508.06163), SPEC 1.

    d = Q_a(|tau|) / (Q_b(|tau|) + eps) clamped to [0, 1]; k = floor(d n); keep
    |tau| >= t, t the (k+1)-th smallest |tau| (k = 0 keeps all, k = n drops all:
    there is no (n+1)-th value); then rescale: 'norm' tau_hat * ||tau|| /
    (||tau_hat|| + eps), 'inverse_keep' tau_hat / (1 - d), 'none'.  d and
    floor(d n) are float64 (float32 cannot even represent n > 2^24), computed
    from the float32 quantiles; norms are float64 sums.  The rescale multiplies
    by the float64 factor rounded to float32.  All-zero stays all-zero.

    Scope 'model': `global_value` is the task's model-wide d (each tensor its own
    threshold).  Scope 'global_threshold': `global_value` is (model-wide d,
    model-wide threshold t): keep |tau| >= t, 'inverse_keep' divides by 1 - d
    (the model-wide d), and the stats' drop_rate is the tensor's realised
    fraction dropped (n - kept) / n.
    """
    a: float = 0.50
    b: float = 0.95
    eps: float = 1e-12
    rescale: str = "norm"
    scope: str = "tensor"
    needs_fit: ClassVar[bool] = True

    def __post_init__(self):
        if self.rescale not in ("norm", "none", "inverse_keep"):
            raise ValueError(f"TADrop rescale {self.rescale!r}: expected norm|none|inverse_keep")
        if self.scope not in ("tensor", "model", "global_threshold"):
            raise ValueError(f"TADrop scope {self.scope!r}: expected tensor|model|global_threshold")
        if not (0.0 <= self.a <= 1.0 and 0.0 <= self.b <= 1.0):
            raise ValueError("TADrop quantiles a, b must lie in [0, 1]")

    def _d(self, qa: float, qb: float) -> float:
        return min(max(qa / (qb + self.eps), 0.0), 1.0)

    def model_ranks(self, n: int) -> list[int]:
        sel = AbsSelector()
        sel.n = n
        return sel.quantile_ranks(self.a) + sel.quantile_ranks(self.b)

    def _model_d(self, sel: AbsSelector) -> float:
        sel.select(self.model_ranks(sel.n))
        return self._d(sel.quantile(self.a), sel.quantile(self.b))

    def model_lo_ranks(self, sel: AbsSelector) -> list[int]:
        ranks = self.model_ranks(sel.n)
        if self.scope == "global_threshold" and sel.n:
            ranks += self._bracket(sel, sel.n)    # usually saves the threshold's own lo pass
        return ranks

    def _threshold_rank(self, sel: AbsSelector) -> int | None:
        """global_threshold: the rank k = floor(d N) of the model-wide threshold, None
        when k = 0 (keep all) or k = N (drop all)."""
        k = math.floor(self._model_d(sel) * sel.n)
        return k if 0 < k < sel.n else None

    def model_extra_ranks(self, sel: AbsSelector) -> list[int]:
        if self.scope != "global_threshold":
            return []
        k = self._threshold_rank(sel)
        return [k] if k is not None and sel.lo_part([k]).needs_lo else []

    def model_value(self, sel: AbsSelector):
        d = self._model_d(sel)
        if self.scope != "global_threshold":
            return d
        k = self._threshold_rank(sel)
        if k is None:
            return (d, 0.0 if math.floor(d * sel.n) <= 0 else math.inf)
        sel.select([k])
        return (d, sel.value(k))

    def _bracket(self, sel: AbsSelector, n: int) -> list[int]:
        """Ranks, one in each bucket that can hold rank floor(d n), judged from the hi
        histogram alone, so that one lo pass usually serves the quantiles and the
        threshold (empty when that would mean too many values)."""
        def bounds(p):
            lo, hi = sel.quantile_ranks(p)
            return sel.bucket_bounds(sel.bucket_of(lo)[0])[0], sel.bucket_bounds(sel.bucket_of(hi)[0])[1]
        (qa_lo, qa_hi), (qb_lo, qb_hi) = bounds(self.a), bounds(self.b)
        k_lo = math.floor(self._d(qa_lo, qb_hi) * (1 - 1e-6) * n)
        k_hi = min(math.floor(self._d(qa_hi, qb_lo) * (1 + 1e-6) * n) + 1, n - 1)
        k_lo = max(k_lo - 1, 1)
        if k_hi < k_lo:
            return []
        (b_lo, first), b_hi = sel.bucket_of(k_lo), sel.bucket_of(k_hi)[0]
        ranks = []
        for b in range(b_lo, b_hi + 1):
            c = sel.bucket_count(b)
            if c:
                ranks.append(first)
                first += c
            if len(ranks) > 8:
                return []
        return ranks if first - ranks[0] <= max(1 << 16, n >> 5) else []

    def _fit(self, chunks: Chunks, n: int, global_value, norm_of_kept,
             whole: torch.Tensor | None = None, pair: bool = False) -> SparsifyStats:
        """pair (whole CPU tensors, norm_of_kept leaving the data as it is): the partition path
        may take both norms from one pass after the threshold (`_fit_partition`)."""
        if self.scope == "global_threshold" and global_value is not None:
            return self._fit_threshold(chunks, n, global_value, norm_of_kept)
        method = whole_method("tadrop" if global_value is None else "one", whole.device) \
            if whole is not None and n else "radix"
        if method != "radix":
            return self._fit_partition(whole, n, global_value, None if pair else norm_of_kept,
                                       NativeOrder if method == "native" else AbsOrder)
        sel, acc = AbsSelector(), None
        for c in chunks():
            c = _flat(c)
            sel.add_hi(c)
            acc = acc or Sum64(c.device, "square")
            acc.add(c)
        S = acc.value() if acc else 0.0
        if n == 0:
            return SparsifyStats(numel=0, drop_rate=0.0, k=0, threshold=0.0, norm_before=0.0,
                                 norm_after=0.0, scale=1.0, kept=0)
        qa = qb = None
        if global_value is None:
            sel.select(sel.quantile_ranks(self.a) + sel.quantile_ranks(self.b))
            sel.select(self._bracket(sel, n))
            _lo_pass(sel, chunks)
            qa, qb = sel.quantile(self.a), sel.quantile(self.b)
            d = self._d(qa, qb)
        else:
            d = min(max(float(global_value), 0.0), 1.0)
        return self._finish(n, S, qa, qb, d, lambda k: _threshold(sel, chunks, k), norm_of_kept)

    def _fit_partition(self, whole, n, global_value, norm_of_kept, Order=AbsOrder) -> SparsifyStats:
        """The same fit on a whole CPU tensor by numpy partition or by native counting (select.py):
        same bits.  norm_of_kept None: ||tau||^2 and ||tau_hat||^2 come from one pass once the
        threshold is known (`sumsq64_pair`), else ||tau||^2 is summed while |tau| is read."""
        flat = _flat(whole)
        pair = S = None
        if norm_of_kept is None:
            order = Order(flat)                    # raises NonFiniteError as the radix histogram would
            pair = lambda t: sumsq64_pair(flat, t)  # noqa: E731
        else:
            acc = Sum64(flat.device, "square")
            order = Order(flat, on_block=acc.add)
            S = acc.value()
        qa = qb = None
        if global_value is None:
            if isinstance(order, NativeOrder):     # the quantiles and the likely threshold: one pass
                order.prepare(*self._native_ranks(order, n))
            qb, qa = order.quantile(self.b), order.quantile(self.a)   # larger rank first: less to scan
            d = self._d(qa, qb)
        else:
            d = min(max(float(global_value), 0.0), 1.0)
        return self._finish(n, S, qa, qb, d, lambda k: (order.value(k), n - order.count_below(k)),
                            norm_of_kept, pair=pair)

    def _native_ranks(self, order: NativeOrder, n: int):
        """The quantiles' ranks, and the range the threshold's rank floor(d n) can take given the
        buckets that hold the quantiles, when it spans few buckets (so that one counting pass
        usually serves the quantiles and the threshold)."""
        (a0, a1, _), (b0, b1, _) = linear_ranks(n, self.a), linear_ranks(n, self.b)
        qa_lo, qa_hi = order.bucket_range(a0)[0], order.bucket_range(a1)[1]
        qb_lo, qb_hi = order.bucket_range(b0)[0], order.bucket_range(b1)[1]
        k_lo = math.floor(self._d(qa_lo, qb_hi) * n)
        k_hi = math.floor(self._d(qa_hi, qb_lo) * n)
        few = 0 <= k_lo <= k_hi < n and order._bucket(k_hi) - order._bucket(k_lo) < 8
        return [a0, a1, b0, b1], ((k_lo, k_hi) if few else None)

    def _fit_threshold(self, chunks, n, global_value, norm_of_kept) -> SparsifyStats:
        """global_threshold: the task's model-wide (d, t) given; this tensor keeps |tau| >= t."""
        d, t = min(max(float(global_value[0]), 0.0), 1.0), float(global_value[1])
        sel, acc, kept = AbsSelector(), None, 0
        for c in chunks():
            c = _flat(c)
            sel.add_hi(c)          # the finiteness check
            acc = acc or Sum64(c.device, "square")
            acc.add(c)
            kept += _count_at_least(c, t)
        if n == 0:
            return SparsifyStats(numel=0, drop_rate=0.0, k=0, threshold=0.0, norm_before=0.0,
                                 norm_after=0.0, scale=1.0, kept=0)
        return self._finish(n, acc.value(), None, None, d, None, norm_of_kept, fixed=(t, kept))

    def _finish(self, n, S, qa, qb, d, threshold, norm_of_kept, fixed=None, pair=None) -> SparsifyStats:
        """pair(t or None) -> (||tau||^2, ||tau_hat||^2 for |tau| >= t): S and the kept norm from one
        pass (S is None then)."""
        if fixed is not None:              # global_threshold: the realised rate is reported
            t, kept = fixed
            k = n - kept
            rate = k / n
        else:
            rate, k = d, math.floor(d * n)
            if k <= 0:
                t, kept = 0.0, n
            elif k >= n:
                t, kept = math.inf, 0
            else:
                t, kept = threshold(k)
        inner = 0 < kept < n
        if pair is not None:
            S, S_hat = pair(t if inner else None)
        if kept == n:
            S_hat = S
        elif kept == 0:
            S_hat = 0.0
        elif pair is None:
            S_hat = norm_of_kept(t)
        if self.rescale == "norm":
            scale = math.sqrt(S) / (math.sqrt(S_hat) + self.eps)
        elif self.rescale == "inverse_keep" and d < 1.0:
            scale = 1.0 / (1.0 - d)
        else:
            scale = 1.0
        return SparsifyStats(numel=n, q_a=qa, q_b=qb, drop_rate=rate, k=k, threshold=t,
                             norm_before=math.sqrt(S), norm_after=scale * math.sqrt(S_hat),
                             scale=scale, kept=kept)

    def fit_streamed(self, chunks, numel, *, global_value=None):
        def norm_of_kept(t):
            acc = None
            for c in chunks():
                c = _flat(c)
                acc = acc or Sum64(c.device, "square")
                acc.add(_shrink(c, t, scratch("phi.f32", c.numel(), torch.float32, c.device)))
            return acc.value()
        return self._fit(chunks, numel, global_value, norm_of_kept)

    def fit(self, tau, *, global_value=None):
        flat = _flat(tau)
        return self.fit_streamed(lambda: (flat,), flat.numel(), global_value=global_value) \
            if flat.device.type != "cpu" else self._fit(
                lambda: (flat,), flat.numel(), global_value, lambda t: _sumsq_kept(flat, t), whole=flat,
                pair=True)

    def fit_apply_(self, tau, key, *, global_value=None):
        flat = tau.view(-1)

        def norm_of_kept(t):  # drop in place now; the rescale follows below
            _shrink(flat, t, flat)
            return sumsq64(flat)
        stats = self._fit(lambda: (flat,), flat.numel(), global_value, norm_of_kept, whole=flat)
        if stats.kept == 0:
            flat.zero_()
        if stats.scale != 1.0:
            flat.mul_(stats.scale)
        return stats

    def apply(self, tau, stats, key):
        if stats.kept == 0:
            return tau.zero_()
        shrink = stats.kept != stats.numel and stats.threshold > 0
        if native.shrink_scale(tau, prev_float32(stats.threshold) if shrink else None,
                               stats.scale if stats.scale != 1.0 else None):
            return tau                     # the same bits in one pass (tests/test_native.py)
        if shrink:
            _shrink(tau, stats.threshold, tau)
        if stats.scale != 1.0:
            tau.mul_(stats.scale)
        return tau

    def elementwise(self, stats):
        if type(self).apply is not TADrop.apply:
            return None
        if stats.kept == 0:
            return (math.inf, 1.0)
        shrink = stats.kept != stats.numel and stats.threshold > 0
        return (prev_float32(stats.threshold) if shrink else -1.0, float(stats.scale))

    def keep_entries(self, tau, stats, out):
        return _keep_at_least(tau, stats, out)

    def rescale_factor(self, stats):
        return float(stats.scale)


@dataclass(frozen=True)
class TopK(Sparsifier):
    """Magnitude top-k (TIES' trim), SPEC 1: keep the max(1, floor(density n))
    largest |tau|, ties at the boundary kept (|tau| >= t), no rescale.  Scope
    'model' uses one threshold per task over the whole flattened model (official
    TIES); then `global_value` is that threshold."""
    density: float = 0.2
    scope: str = "tensor"
    needs_fit: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 <= self.density <= 1.0:
            raise ValueError(f"TopK density {self.density} outside [0, 1]")
        if self.scope not in ("tensor", "model"):
            raise ValueError(f"TopK scope {self.scope!r}: expected tensor|model")

    def _rank(self, n: int) -> int:
        return n - max(1, math.floor(self.density * n))

    def model_ranks(self, n: int) -> list[int]:
        return [self._rank(n)]

    def model_value(self, sel: AbsSelector) -> float:
        r = self._rank(sel.n)
        sel.select([r])
        return sel.value(r)

    def fit(self, tau, *, global_value=None):
        flat = _flat(tau)
        n = flat.numel()
        method = whole_method("one", flat.device) if n and global_value is None else "radix"
        if method != "radix":               # exact, same answer as the radix path (select.py)
            order = (NativeOrder if method == "native" else AbsOrder)(flat)
            k = self._rank(n)
            kept = n - order.count_below(k)
            return SparsifyStats(numel=n, drop_rate=(n - kept) / n, k=k, threshold=order.value(k),
                                 kept=kept)
        return self.fit_streamed(lambda: (flat,), n, global_value=global_value)

    def fit_streamed(self, chunks, numel, *, global_value=None):
        n = numel
        if n == 0:
            return SparsifyStats(numel=0, drop_rate=0.0, k=0, threshold=0.0, kept=0)
        if global_value is None:
            sel = AbsSelector()
            for c in chunks():
                sel.add_hi(_flat(c))
            k = self._rank(n)
            t, kept = _threshold(sel, chunks, k)
        else:
            k, t, kept = None, float(global_value), 0
            for c in chunks():
                kept += _count_at_least(_flat(c), t)
        return SparsifyStats(numel=n, drop_rate=(n - kept) / n, k=k, threshold=t, kept=kept)

    def apply(self, tau, stats, key):
        if stats.threshold > 0:
            _shrink(tau, stats.threshold, tau)
        return tau

    def elementwise(self, stats):
        if type(self).apply is not TopK.apply:
            return None
        return (prev_float32(stats.threshold) if stats.threshold > 0 else -1.0, 1.0)

    def keep_entries(self, tau, stats, out):
        return _keep_at_least(tau, stats, out)

    def rescale_factor(self, stats):
        return 1.0


@dataclass(frozen=True)
class OfficialTopK(TopK):
    """The top-k trim of the official TALL code's TIES (`topk_values_mask`, nik-dim/tall_masks
    src/utils/utils.py:251-282, called with K=20 over each task's whole flattened vector):
    keep |tau| >= the k-th smallest |tau| (1-based, torch.kthvalue) with k = n - int(n * density),
    i.e. the floor(density n) + 1 largest, ties kept; one entry more than `TopK`.  Model scope
    only: the threshold inside `inner: ties_official` (spec.global_phi)."""
    density: float = 0.2
    scope: str = "model"

    def _rank(self, n: int) -> int:
        return max(0, n - math.floor(n * self.density) - 1)


def _block_seed(seed: int, tensor: str, task: str, block: int) -> int:
    h = hashlib.blake2b(repr((int(seed), tensor, task, int(block))).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


DARE_BLOCK = 1 << 16


@dataclass(frozen=True)
class DARE(Sparsifier):
    """Drop each entry with probability p, divide survivors by (1 - p) (SPEC 1).

    The uniform stream is cut in fixed blocks of 2^16 flat elements; block b is
    drawn on CPU by a torch.Generator seeded with a hash of (seed, tensor, task,
    b), then moved to the device.  The bits therefore depend on the element's
    flat index only: never on call order, chunking or device.  `seed` None uses
    the run seed carried by the ChunkKey.  Entry dropped iff u < p (u, p float32).
    """
    p: float = 0.5
    seed: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"DARE p={self.p} must lie in [0, 1)")

    def fit_streamed(self, chunks, numel, *, global_value=None):
        return SparsifyStats(numel=numel, drop_rate=self.p)

    def keep_mask(self, key: ChunkKey, m: int) -> torch.Tensor:
        """float32 [m] on CPU: 1 where the entries key.offset .. key.offset+m-1 survive."""
        seed = key.seed if self.seed is None else self.seed
        off = key.offset
        b0, b1 = off // DARE_BLOCK, (off + m - 1) // DARE_BLOCK
        u = scratch("dare.u", (b1 - b0 + 1) * DARE_BLOCK, torch.float32, "cpu")
        for b in range(b0, b1 + 1):
            g = torch.Generator().manual_seed(_block_seed(seed, key.tensor, key.task, b))
            i = (b - b0) * DARE_BLOCK
            torch.rand(DARE_BLOCK, generator=g, out=u[i:i + DARE_BLOCK])
        s = off - b0 * DARE_BLOCK
        return torch.ge(u[s:s + m], self.p, out=scratch("dare.keep", m, torch.float32, "cpu"))

    def apply(self, tau, stats, key):
        flat = tau.view(-1)
        if self.p == 0.0 or flat.numel() == 0:
            return tau
        keep = self.keep_mask(key, flat.numel()).to(flat.device)
        flat.mul_(keep).div_(1.0 - self.p)
        return tau
