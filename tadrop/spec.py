"""What the engine is asked to do, and the shapes of its inputs and outputs.

`MergeSpec` is the maths layer's whole view of a merge config (SPEC section 2
defaults filled in); `TensorSource` / `TensorSink` are the row-range interfaces
the per-tensor engine (streamed.py) reads and writes through, with in-memory
implementations for tests, benchmarks and the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .sparsify import Identity, OfficialTopK, Sparsifier, TADrop, TopK

METHODS = ("task_arithmetic", "ties", "emr", "tall_masks", "consensus")
INNER = ("task_arithmetic", "ties", "ties_official")
# the official TALL code's TIES keeps each task's top 20% (ties_merging(reset_thresh=20),
# nik-dim/tall_masks src/eval/aggregation.py:109, :129)
OFFICIAL_TIES_DENSITY = 0.2
_DEFAULT_LAM = {"task_arithmetic": 0.3, "ties": 1.0}
_OUTPUTS = {
    "task_arithmetic": frozenset({"merged"}),
    "ties": frozenset({"merged"}),
    "emr": frozenset({"unified", "masks"}),
    "tall_masks": frozenset({"unified", "masks"}),
    "consensus": frozenset({"merged", "masks"}),
}


@dataclass(frozen=True)
class MergeSpec:
    """Everything the maths needs to merge one tensor (SPEC section 2 defaults).

    sparsifier None -> the method's default Phi (ties: TopK(0.2), else Identity);
    lam None -> 0.3 (task_arithmetic) / 1.0 (ties); weights None -> all 1;
    tall_lambdas may be one float for every task.
    task_sparsifiers: one Phi per task (per-model density / p, as mergekit's
    per-model `density`); same kind and scope as `sparsifier`, which they
    replace task by task (`phi(k)`).
    tall_grid: tall_masks only, for `tadrop tune`: the engine also hands the sink the
    masks of every lambda in the grid (`sink.grid_masks(i, r0, r1, masks)`).
    emr_tadrop: how EMR uses a TADrop (or top-k) Phi: 'rescaled' (tau'_k = Phi(tau_k)
    before EMR) or 'mask' (EMR on the raw tau_k, M_k times Phi's keep mask, Phi's
    per-tensor rescale factor stored beside lambda_k), SPEC section 2.
    """
    method: str
    sparsifier: Sparsifier | None = None
    task_names: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    lam: float | None = None
    emr_rescaler: str = "official"
    emr_tadrop: str = "rescaled"
    tall_lambdas: tuple[float, ...] | float = 0.4
    tall_inner: str = "task_arithmetic"
    consensus_k_min: int = 2
    consensus_alpha: float = 0.3
    consensus_inner: str = "task_arithmetic"
    seed: int = 0
    task_sparsifiers: tuple[Sparsifier, ...] | None = None
    tall_grid: tuple[float, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; expected one of {METHODS}")
        K = len(self.task_names)
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        put("task_names", tuple(self.task_names))
        if self.sparsifier is None:
            put("sparsifier", TopK(0.2) if self.method == "ties" else Identity())
        if self.lam is None:
            put("lam", _DEFAULT_LAM.get(self.method))
        put("weights", (1.0,) * K if self.weights is None else tuple(float(w) for w in self.weights))
        tl = self.tall_lambdas
        put("tall_lambdas", (float(tl),) * K if isinstance(tl, (int, float)) else tuple(map(float, tl)))
        put("tall_grid", tuple(float(g) for g in self.tall_grid))
        if self.tall_grid and self.method != "tall_masks":
            raise ValueError("tall_grid is for method tall_masks")
        if len(self.weights) != K or len(self.tall_lambdas) != K:
            raise ValueError("weights and tall_lambdas need one entry per task")
        for attr in ("tall_inner", "consensus_inner"):
            if getattr(self, attr) not in INNER:
                raise ValueError(f"{attr} must be one of {INNER}")
        if self.official_ties and not isinstance(self.sparsifier, Identity):
            raise ValueError("inner 'ties_official' trims inside the TIES step as the official TALL "
                             "code does: the sparsifier must be none")
        if self.emr_rescaler not in ("official", "global"):
            raise ValueError("emr_rescaler must be official or global")
        if self.task_sparsifiers is not None:
            ts = tuple(self.task_sparsifiers)
            put("task_sparsifiers", ts)
            if len(ts) != K:
                raise ValueError("task_sparsifiers need one entry per task")
            base = self.sparsifier
            if any(type(p) is not type(base) or p.scope != base.scope for p in ts):
                raise ValueError("task_sparsifiers must share the sparsifier's kind and scope")
        if self.emr_tadrop not in ("rescaled", "mask"):
            raise ValueError("emr_tadrop must be rescaled or mask")
        if self.emr_mask_mode and not isinstance(self.sparsifier, (TADrop, TopK)):
            raise ValueError("emr_tadrop 'mask' needs a TADrop or top-k sparsifier "
                             f"(got {type(self.sparsifier).__name__})")

    def phi(self, k: int) -> Sparsifier:
        """Task k's sparsifier (its own when task_sparsifiers is set)."""
        return self.sparsifier if self.task_sparsifiers is None else self.task_sparsifiers[k]

    @property
    def inner(self) -> str | None:
        """The merge inside tall_masks / consensus that gives tau_MTL (None for other methods)."""
        return {"tall_masks": self.tall_inner, "consensus": self.consensus_inner}.get(self.method)

    @property
    def official_ties(self) -> bool:
        """tau_MTL by the official TALL code's TIES (model-wide trim, majority sign, disjoint sum)."""
        return self.inner == "ties_official"

    def global_phi(self, k: int) -> Sparsifier | None:
        """The sparsifier whose model-wide statistics the global passes compute for task k:
        a model-scope Phi, else the official TIES trim of `inner: ties_official`, else None."""
        phi = self.phi(k)
        if phi.needs_fit and phi.scope != "tensor":
            return phi
        return OfficialTopK(OFFICIAL_TIES_DENSITY) if self.official_ties else None

    @property
    def global_scope(self) -> bool:
        """Statistics over the whole model are needed before the merge."""
        return self.global_phi(0) is not None if self.K else False

    @property
    def emr_mask_mode(self) -> bool:
        """EMR with Phi's keep mask ANDed into M_k (not Phi applied before EMR)."""
        return self.method == "emr" and self.emr_tadrop == "mask"

    @property
    def K(self) -> int:
        return len(self.task_names)

    @property
    def outputs(self) -> frozenset:
        """Which of 'merged', 'unified', 'masks' this method writes."""
        return _OUTPUTS[self.method]


class TensorSource(Protocol):
    """Rows of the base and task tensors of one name.  0-d tensors have 1 row of 1.

    Optional: `task_delta(k, r0, r1[, out=None])` returning float32 rows of tau_k itself,
    or None when task k is given as theta_k.  A source whose task is a difference (a LoRA
    adapter: tau = scaling * B @ A) hands tau over directly, since
    float32(theta_0 + BA) - theta_0 is not BA; the engine then never calls `task(k, ...)`,
    and reads no base rows for that task outside the combine.  When the method accepts
    `out` (a flat float32 buffer of the rows' numel), the source may write tau there and
    return it (no temporary); any other returned tensor is copied.
    Optional: `task_zero(k) -> bool`, True when tau_k is known to be zero for this tensor
    without reading (an adapter that does not touch it): the engine fills zeros, and fits
    Phi once for all such tasks with the same Phi (the fit of equal inputs is equal).
    """
    shape: tuple
    rows: int
    row_numel: int

    def base(self, r0: int, r1: int) -> torch.Tensor: ...     # stored dtype, read only
    def task(self, k: int, r0: int, r1: int) -> torch.Tensor: ...


class TensorSink(Protocol):
    """Receives float32/bool rows on the engine's device; the tensors are reused
    buffers: consume (cast, copy, write) before returning."""
    def merged(self, r0: int, r1: int, theta: torch.Tensor) -> None: ...
    def unified(self, r0: int, r1: int, vec: torch.Tensor) -> None: ...
    def masks(self, r0: int, r1: int, masks: torch.Tensor) -> None: ...   # bool [K, r1-r0, *rest]


def _geometry(shape) -> tuple[int, int, int]:
    """(numel, rows, row_numel) of a tensor shape; a 0-d tensor is one row of one."""
    shape = tuple(shape)
    n = math.prod(shape)
    if not shape:
        return 1, 1, 1
    return n, shape[0], math.prod(shape[1:])


def _rows_shape(shape, r0: int, r1: int) -> tuple:
    return tuple(shape) if len(shape) == 0 else (r1 - r0, *shape[1:])


class MemorySource:
    """A TensorSource over in-memory tensors (tests, benchmarks, the reference).

    `deltas[k]`, when given and not None, is task k's tau itself (see `task_delta`).
    """

    def __init__(self, base: torch.Tensor, tasks: Sequence[torch.Tensor | None],
                 deltas: Sequence[torch.Tensor | None] | None = None):
        self._base, self._tasks = base, list(tasks)
        self._deltas = list(deltas) if deltas is not None else [None] * len(self._tasks)
        self.shape = tuple(base.shape)
        _, self.rows, self.row_numel = _geometry(self.shape)

    def _rows(self, t, r0, r1):
        return (t.reshape(1) if t.dim() == 0 else t)[r0:r1]

    def base(self, r0, r1):
        return self._rows(self._base, r0, r1)

    def task(self, k, r0, r1):
        return self._rows(self._tasks[k], r0, r1)

    def task_delta(self, k, r0, r1, out=None):
        d = self._deltas[k]
        if d is None:
            return None
        rows = self._rows(d, r0, r1)
        return rows.float() if out is None else out.copy_(rows.reshape(-1))


class MemorySink:
    """A TensorSink that assembles the outputs in memory (float32 / bool, on CPU)."""

    def __init__(self, shape, K: int):
        self.shape, self.K = tuple(shape), K
        self.merged_t = self.unified_t = self.masks_t = None

    def _put(self, dst, r0, r1, src):
        if len(self.shape) == 0:
            dst.copy_(src.reshape(dst.shape))
        else:
            dst[r0:r1].copy_(src)

    def merged(self, r0, r1, theta):
        if self.merged_t is None:
            self.merged_t = torch.empty(self.shape, dtype=torch.float32)
        self._put(self.merged_t, r0, r1, theta)

    def unified(self, r0, r1, vec):
        if self.unified_t is None:
            self.unified_t = torch.empty(self.shape, dtype=torch.float32)
        self._put(self.unified_t, r0, r1, vec)

    def masks(self, r0, r1, masks):
        if self.masks_t is None:
            self.masks_t = torch.empty((self.K, *self.shape), dtype=torch.bool)
        if len(self.shape) == 0:
            self.masks_t.copy_(masks.reshape(self.K))
        else:
            self.masks_t[:, r0:r1].copy_(masks)
