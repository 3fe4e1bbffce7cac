"""The per-tensor engine: Phi + a merge method over row chunks with bounded memory.

One call of `merge_tensor` handles one tensor name for all K tasks:
  pass 1  per task, fit Phi: on the whole tau_k when it fits the budget, else
          streamed over row chunks (hi histogram + ||tau||^2, lo histogram,
          ||tau_hat||^2).  When all K fitted tau'_k fit the budget they are kept,
          and the tensor is read exactly once.
  pass 2  over row chunks, all K task chunks in one reused float32 [K, rows, ...]
          buffer: tau_k = theta_k - theta_0, Phi, weights, the combine, and the
          sink's merged/unified/masks writes; stats rows and EMR partials are
          accumulated on the way.
Sources hand out rows in their stored dtype (often zero-copy mmap views): the
engine only ever reads them, converting into its own float32 buffers on
`device`.  Streamed and whole runs give the same bits (masks, values, stats):
every float64 sum is chunking-invariant (`_buffers.Sum64`).
Model scope adds two statistics passes (`global_pass_hi`, `global_pass_lo`)
whose per-tensor selectors the caller merges per task (`AbsSelector.merge`,
`merge_lo`) before `global_values`.  MergeSpec, the source/sink protocols and
their in-memory versions live in spec.py (re-exported here).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import _bools as B
from . import methods as M
from . import native
from ._buffers import CACHE_BLOCK, begin_scratch_generation, scratch
from .quantile import AbsSelector, NonFiniteError
from .sparsify import ChunkKey, Sparsifier, SparsifyStats, TADrop, TopK
from .spec import (METHODS, MemorySink, MemorySource, MergeSpec, TensorSink,  # noqa: F401 (re-exported)
                   TensorSource, _geometry, _rows_shape)

# histograms, one DARE block, float64 tails and batches (EMR's per-task sums: up to 2 MiB): not
# proportional to the tensor
_FIXED_BYTES = 4 << 20
# Elementwise work (decode, tau, Phi's apply, weights, the combine) runs over blocks of this many
# elements of the flat chunk, so that a block's K task rows and the method's temporaries stay in
# the CPU's caches between the ~20 operations instead of each operation streaming the whole chunk
# through memory (memory bandwidth, shared by the workers, is what a whole-chunk pass costs).
# Every elementwise result depends on its element alone and the float64 sums are chunking-invariant,
# so the block size never changes a bit.
ENGINE_BLOCK = CACHE_BLOCK


def _blocks(m: int, device) -> list[tuple[int, int]]:
    """[j0, j1) cache blocks of a flat chunk of m elements (one block off the CPU: fewer launches)."""
    step = ENGINE_BLOCK if torch.device(device).type == "cpu" else max(m, 1)
    return [(j, min(m, j + step)) for j in range(0, m, step)]


@dataclass(frozen=True)
class TensorPlan:
    chunk_rows: int      # rows per chunk of pass 2 (== rows: everything read once)
    fit_whole: bool      # Phi is fitted on the whole tau_k (else streamed over chunks)
    est_bytes: int       # the engine's peak working memory for this plan
    # what the worker's reused buffers may hold across tensors (its whole budget; 0: est_bytes): buffers
    # a tensor does not use are dropped only past it, so the next tensor of another shape finds them
    pool_bytes: int = 0
    base_whole: bool = False    # row-chunked with fit_whole: the base is held whole in float32 too

    @property
    def scratch_cap(self) -> int:
        return max(self.pool_bytes, self.est_bytes)


# Phi's fit on a whole tau_k, per element: numpy.partition's float32 |tau|, or the radix selection's
# int32 codes and bool bucket mask without the native kernels (measured: 4.25, 0.57 with them)
_FIT_BYTES = 5


def _block_bytes_per_element(spec: MergeSpec, K: int) -> int:
    """Every buffer of the engine per element of a cache block: taus, base, outputs and the method's
    temporaries. Off the CPU a chunk is one block, so this is per element of the chunk there."""
    inner = {"ties": 4 * K + 16, "ties_official": 7 * K + 28}.get(spec.inner, 0)
    per = {
        "task_arithmetic": 4 * K + 24,
        "ties": 8 * K + 40,
        "emr": 12 * K + K + 32,
        "tall_masks": 4 * K + K + 40 + inner,
        "consensus": 4 * K + K + 44 + inner,
    }[spec.method]
    if spec.sparsifier.needs_fit:
        per += 9          # hi codes (int32), lo selection mask (bool), a float32 scratch
    if spec.emr_mask_mode or spec.official_ties:
        per += K          # Phi's / the official trim's keep masks
    return per + 16       # float64 sum blocks, DARE keep mask


def _chunk_bytes_per_element(spec: MergeSpec, K: int) -> int:
    """On the CPU, what is sized by the chunk rather than by the cache block (the method's
    temporaries are per block, `_blocks`): the K float32 taus, the base, the outputs, the sink's
    cast of them (at most float32), Phi's fit on a whole tau_k, the keep masks.
    scripts/bench_memory.py measures it against a worker's memory (bench/memory.md)."""
    per = 4 * K + 4 + 4 + {"task_arithmetic": 4, "ties": 4, "emr": K + 4, "tall_masks": K + 4,
                           "consensus": K + 8}[spec.method]
    if spec.sparsifier.needs_fit:
        per += _FIT_BYTES
    if spec.emr_mask_mode or spec.official_ties:
        per += K + 4      # the keep masks; the official trim's |tau| (its sign pass is per chunk)
    return per + 8        # DARE's keep, float64 tails


def plan_tensor(spec: MergeSpec, shape, K: int, budget_bytes: int, *, name: str | None = None,
                source_bytes_per_element: int = 0, device="cpu") -> TensorPlan:
    """Largest chunk (in rows) that keeps the engine's buffers within `budget_bytes`.

    Everything in one chunk when it fits (single read); else the fit runs on the
    whole tau_k when that needs at most half the budget, streamed otherwise.
    The budget bounds what grows with the tensor; a fixed ~4 MiB (histograms,
    one DARE block, float64 block tails) comes on top and is in `est_bytes`.
    `source_bytes_per_element`: what the source holds per element of the piece being read
    (e.g. mapped input pages, which count in a process's RSS), charged to the budget too.
    On the CPU the method's temporaries take one cache block (ENGINE_BLOCK elements) whatever
    the chunk; on another device the chunk is the block.
    Raises ValueError naming the tensor when not even one row fits.
    """
    n, rows, rn = _geometry(shape)
    src = int(source_bytes_per_element)
    blk = _block_bytes_per_element(spec, K)
    on_cpu = torch.device(device).type == "cpu"
    per = (_chunk_bytes_per_element(spec, K) if on_cpu else blk) + src

    def cost(m: int) -> int:            # the engine's bytes for a chunk of m elements
        return m * per + (min(m, ENGINE_BLOCK) * blk if on_cpu else 0)

    if cost(n) <= budget_bytes or n == 0:
        return TensorPlan(max(rows, 1), True, cost(n) + _FIXED_BYTES, budget_bytes + _FIXED_BYTES)
    # the whole tau_k and Phi's fit on it
    fit_bytes = (4 + _FIT_BYTES + src) * n if spec.sparsifier.needs_fit else 0
    fit_whole = spec.sparsifier.needs_fit and fit_bytes <= budget_bytes // 2
    # the base whole too (saves K - 1 decodes of it) while a quarter of the budget stays for the chunks
    base_whole = fit_whole and budget_bytes - fit_bytes - 4 * n >= budget_bytes // 4
    if base_whole:
        fit_bytes += 4 * n
    left = budget_bytes - (fit_bytes if fit_whole else 0)
    fixed = ENGINE_BLOCK * blk if on_cpu else 0
    chunk_rows = min(rows, max(0, left - fixed) // (rn * per))
    if on_cpu and chunk_rows * rn < ENGINE_BLOCK:   # a chunk within one block: its buffers are the block's
        chunk_rows = min(rows, left // (rn * (per + blk)))
    if chunk_rows < 1:
        raise ValueError(f"tensor {name or '?'} {tuple(shape)}: one row of {rn} elements needs "
                         f"{cost(rn)} bytes of working memory with K={K}, over the memory "
                         f"budget of {budget_bytes} bytes")
    est = _FIXED_BYTES + (fit_bytes if fit_whole else 0) + cost(chunk_rows * rn)
    return TensorPlan(int(chunk_rows), bool(fit_whole), int(est), budget_bytes + _FIXED_BYTES,
                      bool(base_whole and chunk_rows < rows))


@dataclass
class TensorResult:
    stats: list[dict]                       # one row per task (SPEC 4 stats columns)
    emr: M.EMRPartials | None = None        # EMR rescaler partial sums of this tensor
    warnings: list[str] = field(default_factory=list)
    emr_scales: list[float] | None = None   # EMR 'mask': per task, Phi's rescale factor here
    mask_counts: dict | None = None         # methods with masks: {"kept": [K], "hist": [K+1], "numel"}

    def to_dict(self) -> dict:
        """Plain JSON-able form (what a job returns to the driver)."""
        d = {"stats": [dict(r) for r in self.stats],
             "emr": self.emr.to_dict() if self.emr is not None else None,
             "warnings": list(self.warnings)}
        if self.emr_scales is not None:
            d["emr_scales"] = [float(x) for x in self.emr_scales]
        if self.mask_counts is not None:
            d["mask_counts"] = {"kept": [int(v) for v in self.mask_counts["kept"]],
                                "hist": [int(v) for v in self.mask_counts["hist"]],
                                "numel": int(self.mask_counts["numel"])}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorResult":
        emr = M.EMRPartials.from_dict(d["emr"]) if d.get("emr") is not None else None
        scales = d.get("emr_scales")
        return cls([dict(r) for r in d["stats"]], emr, list(d.get("warnings", ())),
                   None if scales is None else [float(x) for x in scales], d.get("mask_counts"))


class _Reader:
    """Loads float32 tau chunks of one tensor into the engine's buffers, checking finiteness.

    A task the source hands over as tau itself (`task_delta`, e.g. a LoRA adapter) or knows to be
    zero (`task_zero`) never needs the base: the fit passes then read no base rows for it."""

    def __init__(self, name, src, spec, device):
        self.name, self.src, self.spec, self.device = name, src, spec, torch.device(device)
        self.n, self.rows, self.rn = _geometry(src.shape)
        phi = spec.sparsifier
        # TADrop always, and tensor-scope TopK, build a hi histogram of every tau_k,
        # which raises NonFiniteError itself (before any output is written)
        self.histogram_checks = isinstance(phi, TADrop) or (isinstance(phi, TopK) and phi.scope == "tensor")
        self._delta_fn = getattr(src, "task_delta", None)
        self._delta_out = self._delta_fn is not None and _takes_out(self._delta_fn)
        zero = getattr(src, "task_zero", None)
        self.zero = [bool(zero(k)) if zero is not None else False for k in range(spec.K)]

    def _check(self, t: torch.Tensor, who: str):
        if t.numel() and not math.isfinite(float(torch.sum(t))):   # cheap test; exact one below
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"tensor {self.name!r}, {who}: non-finite values (NaN/Inf "
                                     "in the checkpoint or theta_k - theta_0 overflowing float32)")

    def base(self, r0, r1, out):
        out.copy_(self.src.base(r0, r1).reshape(-1))
        self._check(out, "base model")
        return out

    def direct(self, k, r0, r1, out):
        """tau_k rows into `out` when the source has them without the base (zero, or
        `task_delta`); None when task k is given as theta_k."""
        if self.zero[k]:
            return out.zero_()
        if self._delta_fn is None:
            return None
        delta = self._delta_fn(k, r0, r1, out=out) if self._delta_out else self._delta_fn(k, r0, r1)
        if delta is None:
            return None
        if delta.data_ptr() != out.data_ptr() or delta.numel() != out.numel():
            out.copy_(delta.reshape(-1))
        if not self.histogram_checks:
            self._check(out, f"task {self.spec.task_names[k]!r}")
        return out

    def tau(self, k, r0, r1, base, out):
        t = self.direct(k, r0, r1, out)
        # None: task k is theta_k; else the source held tau_k itself (an adapter)
        return self.from_theta(k, r0, r1, base, out) if t is None else t

    def from_theta(self, k, r0, r1, base, out):
        rows = self.src.task(k, r0, r1).reshape(-1)
        if rows.dtype == torch.float32 and rows.device == out.device:
            torch.sub(rows, base, out=out)
        else:                                  # convert first: mixed-dtype arithmetic is slow
            for j0, j1 in _blocks(out.numel(), out.device):   # the subtraction reads the block from cache
                o = out[j0:j1]
                o.copy_(rows[j0:j1])
                o.sub_(base[j0:j1])
        if not self.histogram_checks:           # else the fit's histogram pass checks instead
            self._check(out, f"task {self.spec.task_names[k]!r}")
        return out

    def chunks(self, k, chunk_rows):
        """Callable yielding tau_k chunk by chunk (each valid until the next one); base rows are
        read only for a task given as theta_k."""
        cap = min(chunk_rows, self.rows) * self.rn

        def gen():
            tb = scratch("eng.gtau", cap, torch.float32, self.device)
            for r0 in range(0, self.rows, chunk_rows):
                r1 = min(self.rows, r0 + chunk_rows)
                m = (r1 - r0) * self.rn
                t = self.direct(k, r0, r1, tb[:m])
                if t is None:
                    b = self.base(r0, r1, scratch("eng.gbase", cap, torch.float32, self.device)[:m])
                    t = self.from_theta(k, r0, r1, b, tb[:m])
                yield t
        return gen


    def gather(self, k, chunk_rows, whole, base=None):
        """The whole tau_k into `whole`, computed chunk by chunk straight into its slices; `base`:
        the whole base in float32 when the caller holds it (else its rows are read per chunk)."""
        for r0 in range(0, self.rows, chunk_rows):
            r1 = min(self.rows, r0 + chunk_rows)
            dst = whole[r0 * self.rn:r1 * self.rn]
            if self.direct(k, r0, r1, dst) is None:
                if base is not None:
                    b = base[r0 * self.rn:r1 * self.rn]
                else:
                    b = self.base(r0, r1, scratch("eng.gbase", min(chunk_rows, self.rows) * self.rn,
                                                  torch.float32, self.device)[:dst.numel()])
                self.from_theta(k, r0, r1, b, dst)
        return whole


def _takes_out(fn) -> bool:
    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _named(fn, name, task):
    try:
        return fn()
    except NonFiniteError as e:
        if repr(name) in str(e):
            raise
        raise NonFiniteError(f"tensor {name!r}, task {task!r}: {e}") from None


def _stats_row(name, task, st: SparsifyStats, mask_density):
    return {"tensor": name, "task": task, "numel": st.numel, "q_a": st.q_a, "q_b": st.q_b,
            "drop_rate": st.drop_rate, "kept": st.kept, "norm_before": st.norm_before,
            "norm_after": st.norm_after, "mask_density": mask_density}


class _Combiner:
    """Runs the merge method on [K, m] chunks, feeding the sink and accumulating sums."""

    def __init__(self, spec: MergeSpec, shape, device, majority: float | None = None):
        self.spec, self.shape, self.device, self.majority = spec, tuple(shape), device, majority
        self.mask_counts = [0] * spec.K           # per task, the entries its mask keeps
        self.mask_hist = [0] * (spec.K + 1)       # entries kept by exactly c of the K tasks
        self.emr_sums = M.EMRSums(spec.K, device) if spec.method == "emr" else None

    def _mtl(self, taus, inner, out, keep):
        if inner == "ties_official":
            return M.ties_official_vector(taus, keep, self.majority, out=out)
        return (M.ties_vector if inner == "ties" else M.task_sum)(taus, out=out)

    def _count(self, masks):
        self._add_counts(*B.mask_counts(masks))

    def _add_counts(self, kept, hist):
        self.mask_counts = [a + b for a, b in zip(self.mask_counts, kept)]
        self.mask_hist = [a + b for a, b in zip(self.mask_hist, hist)]

    def __call__(self, r0, r1, taus, base, sink, keep=None, prep=None, pre=None):
        """Combines rows r0:r1 (taus float32 [K, m], base [m]) block by block (`_blocks`);
        `prep(j0, j1)` first brings the block's task rows through Phi and the weights, or, for EMR,
        `pre` (float32 [3, K], `fused_apply`) has its kernel do that in the same pass."""
        spec, K, m = self.spec, self.spec.K, base.numel()
        rs = _rows_shape(self.shape, r0, r1)
        method = spec.method
        blocks = _blocks(m, self.device)

        def each(fn):
            for j0, j1 in blocks:
                if prep is not None:
                    prep(j0, j1)
                fn(j0, j1, taus[:, j0:j1], None if keep is None else keep[:, j0:j1])

        if method in ("task_arithmetic", "ties"):
            out = scratch("eng.out", m, torch.float32, self.device)
            merge = M.task_arithmetic if method == "task_arithmetic" else M.ties
            each(lambda j0, j1, t, kp: merge(base[j0:j1], t, spec.lam, out=out[j0:j1]))
            sink.merged(r0, r1, out.view(rs))
            return
        masks = scratch("eng.masks", K * m, torch.bool, self.device).view(K, m)
        uni = scratch("eng.uni", m, torch.float32, self.device)
        if method == "emr":
            def emr(j0, j1, t, kp):   # the masks are counted in the same pass, block by block
                c = M.emr(t, out_uni=uni[j0:j1], out_masks=masks[:, j0:j1], sums=self.emr_sums,
                          keep=kp, pre=pre, counts=True)
                self._add_counts(*c.counts)
            each(emr)
            sink.unified(r0, r1, uni.view(rs))
        else:
            out = scratch("eng.out", m, torch.float32, self.device) if method == "consensus" else None

            def tall(j0, j1, t, kp):
                u = self._mtl(t, spec.inner, uni[j0:j1], kp)
                mk = M.tall_masks(t, u, spec.tall_lambdas, out=masks[:, j0:j1])
                if out is not None:
                    out[j0:j1] = M.consensus(base[j0:j1], u, mk, spec.consensus_k_min,
                                             spec.consensus_alpha)
            each(tall)
            if method == "tall_masks":
                sink.unified(r0, r1, uni.view(rs))
            else:
                sink.merged(r0, r1, out.view(rs))
        if method != "emr":
            self._count(masks)
        sink.masks(r0, r1, masks.view(K, *rs))
        for i, g in enumerate(spec.tall_grid):       # `tadrop tune`: every grid value's masks
            for j0, j1 in blocks:
                M.tall_masks(taus[:, j0:j1], uni[j0:j1], (g,) * K, out=masks[:, j0:j1])
            sink.grid_masks(i, r0, r1, masks.view(K, *rs))


def _official_keep(t: torch.Tensor, threshold: float, out: torch.Tensor) -> torch.Tensor:
    """inner ties_official: the task's model-wide top-k trim, |tau_k| >= its threshold."""
    a = torch.abs(t, out=scratch("eng.abs", t.numel(), torch.float32, t.device))
    return B.compare(a, "ge", float(threshold), out)


def merge_tensor(spec: MergeSpec, name: str, src: TensorSource, sink: TensorSink, plan: TensorPlan,
                 global_values: Sequence[float] | None = None, device="cpu",
                 majority: float | None = None) -> TensorResult:
    """Merges one tensor (all K tasks) chunk by chunk; returns its stats rows and EMR partials.
    global_values: per task, the model-wide value of `spec.global_phi` (model scope);
    majority: inner ties_official's model-wide majority sign (`global_sign_count`)."""
    K, phi, dev = spec.K, spec.sparsifier, torch.device(device)
    begin_scratch_generation(plan.scratch_cap)
    rd = _Reader(name, src, spec, dev)
    n, rows, rn = rd.n, rd.rows, rd.rn
    if spec.global_scope and global_values is None:
        raise ValueError(f"tensor {name!r}: a model-scope sparsifier needs global_values")
    official = spec.official_ties
    if official and majority is None:
        raise ValueError(f"tensor {name!r}: inner ties_official needs the model-wide majority sign")
    thr = list(global_values) if official else None           # the official TIES trim's thresholds
    gv = list(global_values) if global_values is not None and not official else [None] * K
    key = lambda k, off: ChunkKey(spec.seed, name, spec.task_names[k], off)  # noqa: E731
    comb = _Combiner(spec, src.shape, dev, majority)
    stats: list[SparsifyStats | None] = [None] * K
    cr = max(1, min(plan.chunk_rows, rows))
    cap = cr * rn

    mask_mode = spec.emr_mask_mode     # EMR 'mask': keep tau_k raw, Phi's keep mask on the side
    keep_buf = (scratch("eng.keep", K * cap, torch.bool, dev).view(K, cap)
                if (mask_mode or official) and n else None)

    # A task the source knows to be zero here (an adapter that does not touch the tensor) has the
    # same fit as every other such task with the same Phi and global value: fitted once, reused.
    zero_fits: list[tuple] = []

    def zero_fit(k):
        if rd.zero[k] and spec.phi(k).needs_fit:
            for phi_j, gv_j, st in zero_fits:
                if phi_j == spec.phi(k) and gv_j == gv[k]:
                    return st
        return None

    def remember_zero_fit(k):
        if rd.zero[k] and spec.phi(k).needs_fit and zero_fit(k) is None:
            zero_fits.append((spec.phi(k), gv[k], stats[k]))

    def weigh(k, t):
        if spec.weights[k] != 1.0:
            t.mul_(spec.weights[k])

    def fused_apply():
        """float32 [3, K] (lam, scale, weight per task) when EMR's kernel can apply Phi and the
        weights itself in its pass over each block (every task's Phi elementwise, on the CPU with
        the native kernels), else None: then `prep` applies them before the combine."""
        if spec.method != "emr" or mask_mode or official or dev.type != "cpu" or not native.available():
            return None
        parts = [spec.phi(k).elementwise(stats[k]) for k in range(K)]
        if any(p is None for p in parts):
            return None
        return np.array([[p[0] for p in parts], [p[1] for p in parts],
                         [float(spec.weights[k]) for k in range(K)]], dtype=np.float32)

    def prep(taus, keep, offset):
        """prep(j0, j1) for the combiner: Phi's apply (or its keep mask), the official trim, the
        weights, on the block's task rows while they are in cache."""
        if pre is not None:
            return None
        def run(j0, j1):
            for k in range(K):
                t = taus[k, j0:j1]
                if mask_mode:
                    spec.phi(k).keep_entries(t, stats[k], keep[k, j0:j1])
                else:
                    spec.phi(k).apply(t, stats[k], key(k, offset + j0))
                if official:
                    _official_keep(t, thr[k], keep[k, j0:j1])
                weigh(k, t)
        return run

    if n == 0:
        stats = [spec.phi(k).fit_streamed(lambda: (), 0) for k in range(K)]
    elif cr >= rows:                                    # single read: fit, then Phi + combine per block
        taus = scratch("eng.taus", K * n, torch.float32, dev).view(K, n)
        base = rd.base(0, rows, scratch("eng.base", n, torch.float32, dev))
        for k in range(K):
            task = spec.task_names[k]
            t = rd.tau(k, 0, rows, base, taus[k])
            known = zero_fit(k)
            if known is not None:                   # tau_k = 0 fitted already: same stats
                stats[k] = known
            else:
                stats[k] = _named(lambda: spec.phi(k).fit(t, global_value=gv[k]), name, task)
            remember_zero_fit(k)
        pre = fused_apply()
        comb(0, rows, taus, base, sink, keep_buf, prep(taus, keep_buf, 0), pre)
    else:
        taus_buf = scratch("eng.taus", K * cap, torch.float32, dev).view(K, cap)
        # the base in float32 once for all K gathers and every chunk, when the plan has room for it
        base_all = rd.base(0, rows, scratch("eng.wbase", n, torch.float32, dev)) if plan.base_whole else None
        first = [False] * K      # tau_k's first chunk is in taus_buf already (copied from its gather)
        for k in range(K):
            task, phi = spec.task_names[k], spec.phi(k)
            if not phi.needs_fit:
                stats[k] = phi.fit_streamed(lambda: (), n)
            elif zero_fit(k) is not None:
                stats[k] = zero_fit(k)
            elif plan.fit_whole:
                whole = rd.gather(k, cr, scratch("eng.whole", n, torch.float32, dev), base=base_all)
                stats[k] = _named(lambda: phi.fit(whole, global_value=gv[k]), name, task)
                taus_buf[k, :cap].copy_(whole[:cap])    # a copy instead of reading and decoding it again
                first[k] = True
            else:
                stats[k] = _named(lambda: phi.fit_streamed(rd.chunks(k, cr), n, global_value=gv[k]),
                                  name, task)
            remember_zero_fit(k)
        pre = fused_apply()
        base_buf = scratch("eng.base", cap, torch.float32, dev) if base_all is None else None
        for r0 in range(0, rows, cr):
            r1 = min(rows, r0 + cr)
            m = (r1 - r0) * rn
            base = base_all[r0 * rn:r1 * rn] if base_all is not None else rd.base(r0, r1, base_buf[:m])
            taus = taus_buf[:, :m]
            keep = keep_buf[:, :m] if keep_buf is not None else None
            for k in range(K):
                if not (r0 == 0 and first[k]):
                    rd.tau(k, r0, r1, base, taus[k])
            comb(r0, r1, taus, base, sink, keep, prep(taus, keep, r0 * rn), pre)
    has_masks = "masks" in spec.outputs
    rows_out = [_stats_row(name, spec.task_names[k], stats[k],
                           (comb.mask_counts[k] / n if n else 0.0) if has_masks else None)
                for k in range(K)]
    if spec.method == "emr":
        emr = comb.emr_sums.partials(n) if n else M.EMRPartials((0.0,) * K, (0.0,) * K, 0)
    else:
        emr = None
    scales = [spec.phi(k).rescale_factor(stats[k]) for k in range(K)] if mask_mode else None
    counts = ({"kept": comb.mask_counts, "hist": comb.mask_hist, "numel": n}
              if has_masks and n else None)
    return TensorResult(rows_out, emr, emr_scales=scales, mask_counts=counts)


# ---- model scope ------------------------------------------------------------------

def _global_phi(spec: MergeSpec) -> Sparsifier:
    if not spec.global_scope:
        raise ValueError("model-scope passes need a TADrop/TopK sparsifier with scope 'model' "
                         "or 'global_threshold', or inner ties_official")
    return spec.global_phi(0)


def global_sign_count(spec: MergeSpec, name: str, src: TensorSource, plan: TensorPlan,
                      global_values: Sequence[float], device="cpu") -> int:
    """inner ties_official: this tensor's sum over entries of sign(sum_k of the trimmed tau'_k);
    the sum over the model is the official code's majority sign (its sign), which entries whose
    sum is zero take (nik-dim/tall_masks src/utils/ties_utils.py:7-14)."""
    if not spec.official_ties:
        raise ValueError("the sign pass is for inner ties_official")
    begin_scratch_generation(plan.scratch_cap)
    dev = torch.device(device)
    rd = _Reader(name, src, spec, dev)
    if rd.n == 0:
        return 0
    K = spec.K
    cr = max(1, min(plan.chunk_rows, rd.rows))
    taus_buf = scratch("eng.taus", K * cr * rd.rn, torch.float32, dev).view(K, -1)
    keep_buf = scratch("eng.keep", K * cr * rd.rn, torch.bool, dev).view(K, -1)
    base_buf = scratch("eng.base", cr * rd.rn, torch.float32, dev)
    total = 0
    for r0 in range(0, rd.rows, cr):
        r1 = min(rd.rows, r0 + cr)
        m = (r1 - r0) * rd.rn
        base = rd.base(r0, r1, base_buf[:m])
        taus, keep = taus_buf[:, :m], keep_buf[:, :m]
        for k in range(K):
            t = rd.tau(k, r0, r1, base, taus[k])
            _official_keep(t, global_values[k], keep[k])
            if spec.weights[k] != 1.0:
                t.mul_(spec.weights[k])
        total += M.ties_official_sign_sum(taus, keep)
    return total


def global_pass_hi(spec: MergeSpec, name: str, src: TensorSource, plan: TensorPlan,
                   device="cpu") -> list[AbsSelector]:
    """Per task: this tensor's hi histogram of |tau_k| (merge them per task over the model)."""
    _global_phi(spec)
    begin_scratch_generation(plan.scratch_cap)
    rd = _Reader(name, src, spec, device)
    out = []
    for k in range(spec.K):
        sel = AbsSelector()

        def run():
            if rd.n:
                for c in rd.chunks(k, max(1, plan.chunk_rows))():
                    sel.add_hi(c)
        _named(run, name, spec.task_names[k])
        out.append(sel)
    return out


def global_select(spec: MergeSpec, selectors: Sequence[AbsSelector]) -> None:
    """Marks, in each task's merged hi selector, the buckets its model-wide ranks need
    (optional: `global_pass_lo` derives the same buckets itself)."""
    _global_phi(spec)
    for k, s in enumerate(selectors):
        s.select(spec.global_phi(k).model_lo_ranks(s))


def global_pass_lo(spec: MergeSpec, name: str, src: TensorSource, plan: TensorPlan,
                   selectors: Sequence[AbsSelector], device="cpu") -> list[AbsSelector]:
    """Per task: this tensor's lo counts for the buckets the task's model-wide ranks
    need; `selectors` are the merged hi selectors (not modified).  Merge the
    returned parts into them, then call `global_values`."""
    _global_phi(spec)
    return _lo_parts(spec, name, src, plan, [selectors[k].lo_part(spec.global_phi(k).model_lo_ranks(selectors[k]))
                                             for k in range(spec.K)], device)


def _lo_parts(spec, name, src, plan, parts, device) -> list[AbsSelector]:
    begin_scratch_generation(plan.scratch_cap)
    rd = _Reader(name, src, spec, device)
    for k, part in enumerate(parts):
        if rd.n and part.needs_lo:
            for c in rd.chunks(k, max(1, plan.chunk_rows))():
                part.add_lo(c)
    return parts


def global_extra_ranks(spec: MergeSpec, selectors: Sequence[AbsSelector]) -> list[list[int]]:
    """After `global_pass_lo` parts are merged: per task, the ranks a further lo pass
    must resolve (global_threshold: the threshold's rank when the first lo pass's
    bracket missed it); all empty when none is needed."""
    _global_phi(spec)
    return [spec.global_phi(k).model_extra_ranks(s) for k, s in enumerate(selectors)]


def global_pass_extra(spec: MergeSpec, name: str, src: TensorSource, plan: TensorPlan,
                      selectors: Sequence[AbsSelector], ranks: Sequence[Sequence[int]],
                      device="cpu") -> list[AbsSelector]:
    """The further lo pass: per task, this tensor's lo counts for the buckets of
    `ranks[k]` (from `global_extra_ranks`); `selectors` are the merged hi selectors.
    Merge the parts (`merge_lo`), then call `global_values`."""
    _global_phi(spec)
    return _lo_parts(spec, name, src, plan, [selectors[k].lo_part(list(ranks[k]))
                                             for k in range(spec.K)], device)


def global_values(spec: MergeSpec, selectors: Sequence[AbsSelector]) -> list:
    """Per task: TADrop's model-wide drop rate d (scope model), the pair (d, threshold)
    (scope global_threshold), or TopK's model-wide threshold."""
    _global_phi(spec)
    return [spec.global_phi(k).model_value(s) for k, s in enumerate(selectors)]
