"""From a validated config and the input headers to the list of jobs, the shard layouts and the chunking.

Only headers are read here. Everything the output bytes depend on is decided in the plan (chunking
from the memory budget, shard layout from shard_size), never by the executor, so any executor and any
number of workers produce the same bytes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from tadrop import DARE, Identity, MergeSpec, TADrop, TopK, TensorPlan
from tadrop import streamed

from . import sources
from .checkpoints import Checkpoint, InputTable
from .config import MergeConfig, task_sparsify
from .job import Job
from .writers import ShardPlan, plan_shards

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_DTYPE_CODES = {v: k for k, v in _DTYPE_NAMES.items()}

PHASES = ("global_hi", "global_lo", "global_thr", "global_sign", "merge")
MERGED_METHODS = {"task_arithmetic", "ties", "consensus"}
UNIFIED_METHODS = {"emr", "tall_masks"}
MASK_METHODS = {"emr", "tall_masks", "consensus"}


# A worker's Python + torch + zarr runtime lives inside its memory budget too: 153-189 MiB of private
# memory (bench/memory.md's runtime column) and ~100 MiB of shared libraries in its RSS. The engine
# plans with what is left, so that workers x budget + 0.5 GiB holds for the whole process tree's RSS.
RUNTIME_RESERVE = 320 << 20
MASK_CHUNK_ELEMENTS = 1 << 22   # ~512 KiB bit-packed per task and chunk


def mask_chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows per Zarr mask chunk: fixed by the shape alone, so the memory budget (and with it the
    engine's row chunking) never changes the bytes of masks.zarr."""
    rows = shape[0] if shape else 1
    row_numel = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, min(rows, MASK_CHUNK_ELEMENTS // max(1, row_numel)))


log = logging.getLogger("tadrop")


class PlanError(ValueError):
    """The inputs cannot be merged under this config (for example a row larger than the budget)."""


def build_spec(cfg: MergeConfig) -> MergeSpec:
    """The maths layer's view of the config."""
    phi = _sparsifier(cfg, cfg.sparsify)
    per_task = None
    if any(m.sparsify for m in cfg.models):
        per_task = tuple(_sparsifier(cfg, task_sparsify(cfg.sparsify, m.sparsify)) if m.sparsify else phi
                         for m in cfg.models)
    names = tuple(m.name for m in cfg.models)
    return MergeSpec(
        method=cfg.method,
        sparsifier=phi,
        task_sparsifiers=per_task,
        task_names=names,
        weights=tuple(float(m.weight) for m in cfg.models),
        lam=float(cfg.lam),
        emr_rescaler=cfg.emr.rescaler,
        emr_tadrop=cfg.emr.tadrop,
        tall_lambdas=tuple(float(cfg.tall.lambdas.get(n, cfg.tall.default_lambda)) for n in names),
        tall_inner=cfg.tall.inner,
        consensus_k_min=int(cfg.consensus.k_min),
        consensus_alpha=float(cfg.consensus.alpha),
        consensus_inner=cfg.consensus.inner,
        seed=int(cfg.seed),
    )


def _sparsifier(cfg: MergeConfig, s):
    if s.kind == "none":
        phi = Identity()
    elif s.kind == "tadrop":
        phi = TADrop(a=s.a, b=s.b, eps=s.eps, rescale=s.rescale, scope=s.scope)
    elif s.kind == "topk":
        phi = TopK(density=s.density, scope=s.scope)
    elif s.kind == "dare":
        phi = DARE(p=s.p, seed=cfg.seed)
    else:  # config validation makes this unreachable
        raise PlanError(f"unknown sparsify kind {s.kind!r}")
    return phi


@dataclass
class Plan:
    spec: MergeSpec
    merge: list[str]                       # tensors merged
    copy: list[str]                        # tensors copied from the base (only when merged/ is written)
    tensor_plans: dict[str, TensorPlan]
    merged_plan: ShardPlan | None
    unified_plan: ShardPlan | None
    merged_dtypes: dict[str, str]
    unified_dtypes: dict[str, str]
    write_masks: bool
    model_scope: bool
    shapes: dict[str, tuple[int, ...]]
    jobs: dict[str, list[Job]] = field(default_factory=dict)   # phase -> jobs, largest first
    vocab: object = None                   # sources.vocab.Vocab of an extended vocabulary, else None

    @property
    def all_jobs(self) -> list[Job]:
        return [j for phase in PHASES for j in self.jobs.get(phase, [])]

    def summary(self) -> dict:
        jobs = self.all_jobs
        chunked = {n for n, p in self.tensor_plans.items() if p.chunk_rows < (self.shapes[n] or (1,))[0]}
        return {
            "tensors_merged": len(self.merge),
            "tensors_copied": len(self.copy),
            "jobs": len(jobs),
            "jobs_by_phase": {k: len(v) for k, v in self.jobs.items()},
            "input_bytes": sum(j.nbytes for j in jobs),
            "chunked_tensors": len(chunked),
            # inputs of the row-chunked tensors: read once for Phi's fit and again for the combine
            "chunked_input_bytes": sum(j.nbytes for j in self.jobs.get("merge", ())
                                       if j.kind == "merge" and j.tensor in chunked),
            "max_est_bytes_per_worker": max((p.est_bytes for p in self.tensor_plans.values()), default=0),
            "merged_shards": len(self.merged_plan.files) if self.merged_plan else 0,
            "unified_shards": len(self.unified_plan.files) if self.unified_plan else 0,
        }


def warn_small_shards(sp: ShardPlan | None, shard_size: int) -> str | None:
    """Loud warning when shard_size is below the largest tensor: each such tensor gets a shard
    of its own (legal, but rarely meant; mergekit's shard sizes count parameters, not bytes)."""
    if sp is None:
        return None
    sizes = [(t.nbytes, n) for s in sp.shards for n, t in s.tensors.items()]
    over = [n for b, n in sizes if b > shard_size]
    if not over:
        return None
    big, name = max(sizes)
    msg = (f"shard_size {shard_size} bytes is below the largest tensor ({name}, {big} bytes): "
           f"{len(over)} of {len(sizes)} tensors get a shard of their own, {len(sp.shards)} shards in all; "
           f"shard sizes are bytes (5GB is the usual choice; mergekit's '5B' counts parameters)")
    log.warning(msg)
    return msg


def make_plan(cfg: MergeConfig, base: Checkpoint, models: list[Checkpoint], table: InputTable,
              vocab=None, tall_grid: tuple[float, ...] = ()) -> Plan:
    """`vocab` (sources.vocab.Vocab): extended vocabulary tensors get the output's row count;
    `tall_grid`: `tadrop tune`'s grid (its masks are planned for too)."""
    spec = build_spec(cfg)
    if tall_grid:
        spec = replace(spec, tall_grid=tuple(float(g) for g in tall_grid))

    def out_shape(name: str) -> tuple:
        s = tuple(base.tensors[name].shape)
        return vocab.shape(name, s) if vocab is not None and vocab.extended else s

    k = len(models)
    budget = int(cfg.memory_budget)
    method = cfg.method
    tensor_plans: dict[str, TensorPlan] = {}
    engine_budget = budget - min(RUNTIME_RESERVE, budget // 4)
    for name in table.merge:
        shape = out_shape(name) or (1,)
        mapped = max(sources.mapped_itemsize(c, name) for c in (base, *models))
        if vocab is not None and name in vocab.rows:
            mapped += 12     # the extended base rows: a float64 sum and the float32 mean
        mrows = mask_chunk_rows(shape)
        try:
            tp = streamed.plan_tensor(spec, shape, k, engine_budget, name=name,
                                      source_bytes_per_element=mapped, device=cfg.device)
        except ValueError as e:
            raise PlanError(f"{e} (raise memory_budget)") from None
        if method in MASK_METHODS and tp.chunk_rows < min(mrows, shape[0]):
            # chunks smaller than a Zarr mask chunk gather their mask rows in the sink's staging
            # buffer (K bools per element of up to two mask chunks; one per `tadrop tune` grid value).
            # A budget too small for that too (a few KiB, as tests use) keeps the plan without it.
            row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            stage = 2 * (1 + len(spec.tall_grid)) * k * mrows * row
            try:
                tp = streamed.plan_tensor(spec, shape, k, engine_budget - stage, name=name,
                                          source_bytes_per_element=mapped, device=cfg.device)
                tp = replace(tp, est_bytes=tp.est_bytes + stage, pool_bytes=engine_budget)
            except ValueError:
                pass
        if mrows <= tp.chunk_rows < shape[0]:  # whole mask chunks per engine chunk: no buffering
            tp = replace(tp, chunk_rows=tp.chunk_rows // mrows * mrows)
        tensor_plans[name] = tp

    merged_dtypes: dict[str, str] = {}
    for name in table.merge:
        merged_dtypes[name] = cfg.output_dtype or _DTYPE_NAMES[base.tensors[name].dtype]
    unified_dtypes = {n: cfg.unified_dtype or d for n, d in merged_dtypes.items()}

    merged_plan = unified_plan = None
    copy = list(table.copy) if method in MERGED_METHODS else []
    if method in MERGED_METHODS:
        entries = []
        for name in sorted([*table.merge, *copy]):
            info = base.tensors[name]
            dtype = _DTYPE_CODES[merged_dtypes[name]] if name in merged_dtypes else info.dtype
            entries.append((name, dtype, out_shape(name)))
        merged_plan = plan_shards(entries, int(cfg.shard_size))
    if method in UNIFIED_METHODS:
        entries = [(n, _DTYPE_CODES[unified_dtypes[n]], out_shape(n)) for n in sorted(table.merge)]
        unified_plan = plan_shards(entries, int(cfg.shard_size))

    model_scope = spec.global_scope      # a model-scope Phi, or the official TIES trim of inner ties_official
    for sp in (merged_plan, unified_plan):
        warn_small_shards(sp, int(cfg.shard_size))
    plan = Plan(
        spec=spec, merge=list(table.merge), copy=copy, tensor_plans=tensor_plans,
        merged_plan=merged_plan, unified_plan=unified_plan, merged_dtypes=merged_dtypes,
        unified_dtypes=unified_dtypes,
        write_masks=method in MASK_METHODS, model_scope=model_scope,
        shapes={n: out_shape(n) for n in table.merge}, vocab=vocab,
    )

    def input_bytes(name: str) -> int:
        return base.tensors[name].nbytes + sum(sources.input_bytes(m, name) for m in models)

    merge_jobs = [Job("merge", n, input_bytes(n)) for n in table.merge]
    merge_jobs += [Job("copy", n, base.tensors[n].nbytes) for n in copy]
    files = {f: i for i, f in enumerate(sorted({t.file for t in base.tensors.values()}))}
    position = {n: (files[t.file], t.offset) for n, t in base.tensors.items()}
    plan.jobs["merge"] = job_order(merge_jobs, position)
    if model_scope:
        hi = [Job("global_hi", n, input_bytes(n)) for n in table.merge]
        plan.jobs["global_hi"] = job_order(hi, position)
        plan.jobs["global_lo"] = [Job("global_lo", j.tensor, j.nbytes) for j in plan.jobs["global_hi"]]
        if spec.sparsifier.scope == "global_threshold":   # only run when the lo pass missed a threshold
            plan.jobs["global_thr"] = [Job("global_thr", j.tensor, j.nbytes) for j in plan.jobs["global_hi"]]
        if spec.official_ties:                  # the majority sign of the official TIES
            plan.jobs["global_sign"] = [Job("global_sign", j.tensor, j.nbytes) for j in plan.jobs["global_hi"]]
    return plan


def job_order(jobs: list[Job], position: dict[str, tuple[int, int]]) -> list[Job]:
    """The order jobs are handed out: the long poles first, then the inputs' file order.

    Jobs over 4x the mean size (an embedding, an untied LM head) start first, largest first, so no
    worker is left with one at the end.  The rest follow the order of the tensors in the base's
    files: the kernel's read-ahead past the end of one tensor (`read_ahead_kb`, often megabytes) is
    the start of the next one's bytes, used by the next job while it is still in the page cache.  In
    size order it is the start of a tensor many jobs later: the run meets it cached only if nothing
    evicted it meanwhile, and a resume with a cold cache reads it again, on top of the jobs in
    flight.  Measured at K = 32 (README "Resume"): dropping the page cache half-way through a run
    cost 11.5 s in size order and nothing in file order, which also ran 5-6 s faster in two paired
    runs.  File order also reads each file front to back, what network file systems and disks
    stream fastest.  The last 10% of the bytes go largest first, so the run ends on small jobs.
    Only the order changes, never the bytes written.
    """
    if not jobs:
        return []
    total = sum(j.nbytes for j in jobs)
    mean = total / len(jobs)
    where = lambda j: (*position.get(j.tensor, (len(position), 0)), j.tensor)  # noqa: E731
    big = sorted((j for j in jobs if j.nbytes > 4 * mean), key=lambda j: (-j.nbytes, where(j)))
    rest = sorted((j for j in jobs if j.nbytes <= 4 * mean), key=where)
    tail_bytes, cut = 0, len(rest)
    while cut > 0 and tail_bytes + rest[cut - 1].nbytes <= 0.1 * total:
        cut -= 1
        tail_bytes += rest[cut].nbytes
    tail = sorted(rest[cut:], key=lambda j: (-j.nbytes, where(j)))
    return big + rest[:cut] + tail


def describe(plan: Plan, base: Checkpoint) -> str:
    """The human-readable plan printed by --dry-run."""
    s = plan.summary()
    lines = [
        f"method: {plan.spec.method}   sparsifier: {plan.spec.sparsifier}",
        f"tasks ({len(plan.spec.task_names)}): {', '.join(plan.spec.task_names)}",
        *([f"per-task sparsifiers: " + ", ".join(f"{t}: {p}" for t, p in
                                                   zip(plan.spec.task_names, plan.spec.task_sparsifiers))]
          if plan.spec.task_sparsifiers else []),
        f"tensors: {s['tensors_merged']} merged, {s['tensors_copied']} copied from the base",
        f"jobs: {s['jobs']} ({', '.join(f'{k} {v}' for k, v in s['jobs_by_phase'].items())})",
        f"input bytes read: {_gb(s['input_bytes'])}",
        f"row-chunked tensors (inputs larger than the memory budget): {s['chunked_tensors']}"
        + (f" ({_gb(s['chunked_input_bytes'])} of inputs, read more than once)" if s['chunked_tensors'] else ""),
        f"estimated peak memory per worker: {_gb(s['max_est_bytes_per_worker'])}",
        f"outputs: merged/ {s['merged_shards']} shard(s), unified/ {s['unified_shards']} shard(s), "
        f"masks.zarr: {'yes' if plan.write_masks else 'no'}",
        "",
        f"{'tensor':60s} {'shape':>18s} {'bytes in':>10s} {'chunk rows':>10s} {'est. mem':>10s}",
    ]
    for job in plan.jobs["merge"]:
        if job.kind != "merge":
            continue
        tp = plan.tensor_plans[job.tensor]
        shape = "x".join(map(str, base.tensors[job.tensor].shape)) or "scalar"
        lines.append(f"{job.tensor[:60]:60s} {shape:>18s} {_gb(job.nbytes):>10s} "
                     f"{tp.chunk_rows:>10d} {_gb(tp.est_bytes):>10s}")
    return "\n".join(lines)


def _gb(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"

