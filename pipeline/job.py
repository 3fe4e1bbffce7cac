"""The unit of work: one tensor. A `JobRunner` lives in a worker and runs jobs against mmapped inputs.

Every job writes its own outputs (its byte range of the shard files, its own Zarr chunks, its own
statistics file), makes them durable, and only then returns a small JSON-able dict to the driver,
which records it in the ledger. Re-running a job rewrites the same bytes, so a job killed halfway is
simply run again on resume.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tadrop import AbsSelector, MergeSpec, NonFiniteError, TensorPlan
from tadrop import streamed
from tadrop._buffers import scratch, scratch_allocated

from .checkpoints import Checkpoint
from .faults import crash_point, job_fault, write_fault
from .globalstats import (EXTRA_FILE, MAJORITY_FILE, SELECTED_FILE, VALUES_FILE, job_file, load_majority,
                          load_ranks, load_selectors, load_values, save_selectors)
from .sources import RowSource as _Source
from .writers import MaskStore, ShardPlan, ShardWriter, sync_mask_chunks, syncfs, syncfs_usable

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class JobError(RuntimeError):
    """An application error in a job (bad tensor, NaN, I/O failure): fails the run, names the tensor."""


FLOAT16_MAX = 65504.0


def check_float16(rows: torch.Tensor, name: str, clamp: bool, warnings: list[str]) -> torch.Tensor:
    """float32 rows about to be cast to float16: a magnitude beyond float16's range would become inf.
    An error naming the tensor and its largest magnitude, or (clamp_overflow: true) a clamp and a
    warning. Only float16 outputs pay for this check."""
    peak = float(rows.abs().max()) if rows.numel() else 0.0
    if peak <= FLOAT16_MAX:
        return rows
    if not clamp:
        raise JobError(f"tensor '{name}': float16 overflow: largest magnitude {peak:.6g} exceeds "
                       f"float16's {FLOAT16_MAX:g} (use output_dtype bfloat16/float32, or set "
                       "clamp_overflow: true to clamp)")
    warnings.append(f"tensor '{name}': clamped to +-{FLOAT16_MAX:g} for float16 (largest magnitude {peak:.6g})")
    return rows.clamp(-FLOAT16_MAX, FLOAT16_MAX)


@dataclass(frozen=True)
class Job:
    """One tensor's work in one phase. `id` is stable across runs: it keys the ledger."""

    kind: str          # 'global_hi' | 'global_lo' | 'global_thr' | 'global_sign' | 'merge' | 'copy'
    tensor: str
    nbytes: int        # input bytes read (for progress and scheduling)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.tensor}"

    def describe(self) -> str:
        return f"job {self.kind} of tensor '{self.tensor}'"


@dataclass(frozen=True)
class RunContext:
    """Everything a worker needs, pickled once per worker."""

    state_dir: Path
    base: Checkpoint
    models: tuple                          # Checkpoint (theta_k) or sources.LoraAdapter (tau_k)
    spec: MergeSpec
    tensor_plans: dict[str, TensorPlan]
    merged_plan: ShardPlan | None          # None when the method writes no merged/
    unified_plan: ShardPlan | None
    merged_dtypes: dict[str, str] = field(default_factory=dict)   # tensor -> output dtype name
    unified_dtypes: dict[str, str] = field(default_factory=dict)
    write_masks: bool = False
    device: str = "cpu"
    torch_threads: int = 1
    model_scope: bool = False              # merge jobs read per-task values from global/values.npz
    clamp_overflow: bool = False           # float16 output: clamp (with a warning) instead of failing
    vocab: object = None                   # sources.vocab.Vocab when the vocabulary is extended
    # The driver fsyncs each job's outputs before the ledger records it (workers on this machine):
    # a worker then goes on to its next job instead of waiting for the disk (`Durability`).
    sync_in_driver: bool = False
    input_bytes: int = 0                   # the run's input bytes, all jobs (`evict_inputs`)

    @property
    def merged_dir(self) -> Path:
        return self.state_dir / "merged.partial"

    @property
    def unified_dir(self) -> Path:
        return self.state_dir / "unified.partial"

    @property
    def masks_path(self) -> Path:
        return self.state_dir / "masks.zarr.partial"

    @property
    def global_dir(self) -> Path:
        return self.state_dir / "global"


PREFETCH_BYTES = 1 << 30   # read-ahead of one job's inputs, summed over the K+1 files
EVICT_ENV = "TADROP_EVICT_INPUTS"


def evict_inputs(input_bytes: int, reread: bool = False) -> bool:
    """Whether a worker drops each job's inputs from the page cache when the job is done: when the
    run's inputs exceed half this machine's memory (an out-of-core run: the cache cannot keep them
    for a next run, and the reads then recycle the same memory, see `Checkpoint.evict`), or, for a
    run that reads every input again in a later phase (`reread`: model scope), when they exceed
    all of it (below that the later phases read them from the cache).  Smaller runs keep them
    cached (a re-run, `tadrop tune`, reads them warm).  TADROP_EVICT_INPUTS=1|0 forces it."""
    forced = os.environ.get(EVICT_ENV, "auto").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return False
    return input_bytes > (mem if reread else mem // 2)


class _Sink:
    """Casts float32 rows once to the output dtype and writes them in place into the shard files;
    gathers mask rows into whole Zarr chunks (their size is fixed by the shape, not the budget)."""

    def __init__(self, runner: "JobRunner", name: str, rows: int, slot: int = 0):
        """slot: sinks alive at the same time (`tadrop tune`'s grid) each take their own slot."""
        self._r, self._name, self._rows, self._slot = runner, name, rows, slot
        self._stage: np.ndarray | None = None    # (K, rows, row_numel) bool: mask rows not yet a whole chunk
        self._have = 0                           # rows held in it, from _pending_r0
        self._pending_r0 = 0

    def _write(self, writer: ShardWriter, dtype: torch.dtype, r0: int, rows: torch.Tensor) -> None:
        write_fault()
        if dtype == torch.float16:
            rows = check_float16(rows, self._name, self._r.ctx.clamp_overflow, self._r.warnings)
        # cast into a reused buffer: a fresh one per job is paid again in page faults (first touch of
        # new memory runs at well under 1 GB/s on the machines we measured)
        out = scratch("sink.cast", rows.numel(), dtype, "cpu").view(rows.shape)
        out.copy_(rows)
        writer.write(self._name, out, row_start=r0)

    def merged(self, r0: int, r1: int, theta: torch.Tensor) -> None:
        dtype = TORCH_DTYPES[self._r.ctx.merged_dtypes[self._name]]
        self._write(self._r.merged_writer, dtype, r0, theta)

    def unified(self, r0: int, r1: int, vec: torch.Tensor) -> None:
        self._write(self._r.unified_writer, TORCH_DTYPES[self._r.ctx.unified_dtypes[self._name]], r0, vec)

    def masks(self, r0: int, r1: int, masks: torch.Tensor) -> None:
        store = self._r.mask_store
        m = masks.to("cpu").numpy()
        if not m.ndim or m.ndim == 1:  # a 0-d tensor: one element per task
            store.write(self._name, 0, m)
            return
        cr = store.chunk_rows(self._name)
        if not self._have and r0 % cr == 0 and (r1 % cr == 0 or r1 == self._rows):
            store.write(self._name, r0, m)  # the common case: whole chunks already
            return
        # Engine chunks smaller than a mask chunk (K = 32 at a 2 GiB budget: all of them) gather in one
        # reused buffer; a concatenation per chunk allocated ~3x the rows' bytes each time, fresh
        # memory the kernel zeroes: 36 GB of huge pages in one K = 32 run.
        k, n, tail = m.shape[0], m.shape[1], m.shape[2:]
        if not self._have:
            self._pending_r0 = r0
        need = self._have + n
        stage = self._staging(k, need, int(np.prod(tail, dtype=np.int64)))
        stage[:, self._have:need] = m.reshape(k, n, -1)
        end = self._pending_r0 + need
        whole = (end // cr * cr if end < self._rows else end) - self._pending_r0
        if whole > 0:
            store.write(self._name, self._pending_r0, stage[:, :whole].reshape(k, whole, *tail))
            rest = need - whole                  # < cr <= whole: the two ranges do not overlap
            stage[:, :rest] = stage[:, whole:need]
            self._pending_r0 += whole
            need = rest
        self._have = need

    def _staging(self, k: int, rows: int, row_numel: int) -> np.ndarray:
        """The staging buffer, holding at least `rows` rows (grown keeping the rows it holds)."""
        old = self._stage
        if old is not None and old.shape[1] >= rows:
            return old
        # rows held stay below two mask chunks (fewer than one left over + an engine chunk smaller than
        # one): sized for that at once, it never grows (a growth holds the old and the new buffer)
        cap = max(rows, 2 * self._r.mask_store.chunk_rows(self._name))
        buf = scratch(f"sink.masks.{self._slot}", k * cap * row_numel, torch.bool, "cpu")
        buf = buf.numpy().reshape(k, cap, row_numel)
        if old is not None and self._have:
            buf[:, :self._have] = old[:, :self._have]
        self._stage = buf
        return buf


def _usage() -> tuple:
    r = resource.getrusage(resource.RUSAGE_SELF)
    io = 0
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"read_bytes:"):
                    io = int(line.split()[1])
    except OSError:
        pass
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt, r.ru_majflt, io, scratch_allocated()


def _usage_delta(a: tuple, b: tuple) -> dict:
    """What one job cost its worker (the ledger keeps it; `tadrop status` and the benchmarks read it):
    wall and CPU seconds, page faults, bytes it read from disk, bytes of new scratch buffers."""
    return {"pid": os.getpid(), "wall_s": round(b[0] - a[0], 4), "user_s": round(b[1] - a[1], 4),
            "sys_s": round(b[2] - a[2], 4), "minflt": b[3] - a[3], "majflt": b[4] - a[4],
            "read_bytes": b[5] - a[5], "scratch_alloc_bytes": b[6] - a[6]}


class JobRunner:
    """Built once per worker process; opens outputs lazily and keeps the inputs mmapped."""

    def __init__(self, ctx: RunContext):
        torch.set_num_threads(ctx.torch_threads)
        self.ctx = ctx
        self.merged_writer = ShardWriter(ctx.merged_plan, ctx.merged_dir) if ctx.merged_plan else None
        self.unified_writer = ShardWriter(ctx.unified_plan, ctx.unified_dir) if ctx.unified_plan else None
        self.mask_store = MaskStore.open(ctx.masks_path) if ctx.write_masks else None
        # a worker that makes its own outputs durable does it with one syncfs per job where it can
        self._syncfs = not ctx.sync_in_driver and syncfs_usable(ctx.state_dir)
        if self.mask_store is not None:
            self.mask_store.defer_sync = ctx.sync_in_driver or self._syncfs
        self._sel: list[AbsSelector] | None = None
        self._values: list[float] | None = None
        self.warnings: list[str] = []
        self.evict = evict_inputs(ctx.input_bytes, reread=ctx.model_scope)

    # -- helpers ---------------------------------------------------------------------------------
    def _source(self, name: str) -> _Source:
        return _Source(self.ctx.base, self.ctx.models, name, self.ctx.vocab)

    def _selected(self) -> list[AbsSelector]:
        """Model scope: the merged hi histograms, written by the driver between the two passes."""
        if self._sel is None:
            self._sel = load_selectors(self.ctx.global_dir / SELECTED_FILE, len(self.ctx.models))
        return self._sel

    def _global_values(self) -> list[float]:
        """Model scope: each task's model-wide drop rate or threshold, written by the driver."""
        if self._values is None:
            self._values = load_values(self.ctx.global_dir / VALUES_FILE)
        return self._values

    def _prefetch(self, name: str) -> None:
        """Start the reads of this tensor in every input file at once (bounded: PREFETCH_BYTES over
        all inputs, so a huge tensor of many tasks does not flood the page cache)."""
        ckpts = [c for c in (self.ctx.base, *self.ctx.models) if isinstance(c, Checkpoint)]
        each = PREFETCH_BYTES // max(1, len(ckpts))
        for ckpt in ckpts:
            if name in ckpt.tensors:
                ckpt.prefetch(name, each)

    def _release(self, name: str) -> None:
        """Drop the tensor's pages from this process's mappings so RSS stays bounded (page cache keeps
        them, unless the run is out of core: `evict_inputs`)."""
        for ckpt in (self.ctx.base, *self.ctx.models):
            ckpt.release(name)
            if self.evict:
                ckpt.evict(name)

    # -- jobs --------------------------------------------------------------------------------------
    def run(self, job: Job) -> dict:
        before = _usage()
        result = self._run(job)
        if isinstance(result, dict):
            result["worker"] = _usage_delta(before, _usage())
        return result

    def _run(self, job: Job) -> dict:
        self.warnings = []   # a failed earlier attempt leaves nothing behind for this one
        if self.mask_store is not None:
            self.mask_store.take_checksums(job.tensor)
        job_fault()
        if job.kind in ("merge", "copy", "global_hi", "global_lo", "global_thr", "global_sign"):
            self._prefetch(job.tensor)
        try:
            if job.kind == "merge":
                return self._merge(job.tensor)
            if job.kind == "copy":
                return self._copy(job.tensor)
            if job.kind == "global_hi":
                return self._global_hi(job.tensor)
            if job.kind == "global_lo":
                return self._global_lo(job.tensor)
            if job.kind == "global_thr":
                return self._global_thr(job.tensor)
            if job.kind == "global_sign":
                return {"sign_sum": streamed.global_sign_count(
                    self.ctx.spec, job.tensor, self._source(job.tensor), self.ctx.tensor_plans[job.tensor],
                    self._global_values(), device=self.ctx.device)}
            raise JobError(f"unknown job kind {job.kind!r}")
        except JobError:
            raise
        except NonFiniteError as e:
            raise JobError(f"tensor '{job.tensor}': {e}") from None
        except OSError as e:
            raise JobError(f"tensor '{job.tensor}': I/O error: {e}") from None
        except Exception as e:
            raise JobError(f"tensor '{job.tensor}': {type(e).__name__}: {e}") from e
        finally:
            self._release(job.tensor)

    def _merge(self, name: str) -> dict:
        ctx = self.ctx
        global_values = self._global_values() if ctx.model_scope else None
        majority = (load_majority(ctx.global_dir / MAJORITY_FILE) if ctx.spec.official_ties else None)
        src = self._source(name)
        sink = _Sink(self, name, src.rows)
        result = streamed.merge_tensor(
            ctx.spec, name, src, sink, ctx.tensor_plans[name],
            global_values=global_values, device=ctx.device, majority=majority,
        )
        self._sync()
        return self._finish(name, result.to_dict())   # with the mask counts (storage accounting)

    def _copy(self, name: str) -> dict:
        """Integer/bool/passthrough tensors: the base bytes, unchanged, into the merged shards."""
        view = self.ctx.base.view(name)
        self.merged_writer.write(name, view.contiguous())
        self._sync()
        return self._finish(name, {"copied": name})

    def _finish(self, name: str, result: dict) -> dict:
        """Add the checksums of what this job wrote (integrity.verify) and its warnings."""
        sums = {}
        for kind, writer in (("merged", self.merged_writer), ("unified", self.unified_writer)):
            if writer is not None and name in writer.plan.weight_map:
                sums[kind] = writer.checksum(name)
        if self.mask_store is not None:
            masks = self.mask_store.take_checksums(name)
            if masks:
                sums["masks"] = masks
        result["checksums"] = sums
        if self.warnings:
            result["warnings"], self.warnings = self.warnings, []
        return result

    def _global_hi(self, name: str) -> dict:
        sels = streamed.global_pass_hi(self.ctx.spec, name, self._source(name), self.ctx.tensor_plans[name],
                                       device=self.ctx.device)
        return self._save_selectors(name, "hi", sels)

    def _global_lo(self, name: str) -> dict:
        sels = streamed.global_pass_lo(self.ctx.spec, name, self._source(name), self.ctx.tensor_plans[name],
                                       self._selected(), device=self.ctx.device)
        return self._save_selectors(name, "lo", sels)

    def _global_thr(self, name: str) -> dict:
        """global_threshold: the lo counts of the threshold ranks the first lo pass missed."""
        ranks = load_ranks(self.ctx.global_dir / EXTRA_FILE, len(self.ctx.models))
        sels = streamed.global_pass_extra(self.ctx.spec, name, self._source(name), self.ctx.tensor_plans[name],
                                          self._selected(), ranks, device=self.ctx.device)
        return self._save_selectors(name, "thr", sels)

    def _save_selectors(self, name: str, phase: str, sels: list[AbsSelector]) -> dict:
        path = job_file(self.ctx.global_dir, phase, name)
        save_selectors(path, sels)
        crash_point("global_file")   # in the worker: its file written, the job not yet reported
        return {"file": str(path.relative_to(self.ctx.state_dir))}

    def _sync(self) -> None:
        for w in (self.merged_writer, self.unified_writer):
            if w is not None:
                if self.ctx.sync_in_driver or self._syncfs:
                    w.forget_dirty()        # Durability syncs them in the driver, or syncfs below
                else:
                    w.sync()
        if self._syncfs:
            syncfs(self.ctx.state_dir)


class Durability:
    """Driver side of `sync_in_driver`: makes what a job wrote durable before the ledger records
    the job.  Where the run directory's file system allows (`syncfs_usable`), one syncfs(2) per
    job; else an fsync of its shard files (their byte ranges are named by its checksums) and of
    each mask chunk file and directory.  The shard files stay open here across jobs; each result's
    sync also covers whatever other jobs have written meanwhile (harmless: it only makes more
    bytes durable)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self._fds: dict[Path, int] = {}
        self._syncfs = syncfs_usable(ctx.state_dir)

    def __call__(self, result: dict) -> None:
        sums = result.get("checksums") if isinstance(result, dict) else None
        if not sums:
            return
        if self._syncfs:
            syncfs(self.ctx.state_dir)
            return
        for kind, directory in (("merged", self.ctx.merged_dir), ("unified", self.ctx.unified_dir)):
            if kind in sums:
                path = directory / sums[kind][0]
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                os.fsync(fd)
        masks = sums.get("masks")
        if masks:
            sync_mask_chunks(self.ctx.masks_path, masks["array"], masks["chunks"])

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

