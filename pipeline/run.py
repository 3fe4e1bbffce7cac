"""The driver: validate -> identify the run (resume or refuse) -> plan -> phases on an executor -> reduce.

A run directory is claimed by `run.json` (written before any work, `"complete": false`); the ledger
in `.tadrop/` records finished jobs; the reduce renames the finished outputs into place and only
then sets `"complete": true`. Re-running the same command therefore continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tadrop import streamed

from . import integrity, sources
from .checkpoints import Checkpoint, CheckpointError, _summarize, validate_inputs
from .config import MergeConfig, check_device
from .executor import Executor, LocalExecutor, WorkerLost, local_executor
from .faults import crash_point
from .globalstats import (EXTRA_FILE, MAJORITY_FILE, SELECTED_FILE, VALUES_FILE, merge_selector_files,
                          save_majority, save_ranks, save_selectors, save_values)
from .job import Durability, Job, RunContext
from .ledger import Ledger
from .plan import Plan, describe, make_plan, mask_chunk_rows
from .progress import Progress
from .reduce import reduce_run
from .warm import machine_limits
from .writers import MaskStore, atomic_write_json, create_shard_files, encode_array_name

log = logging.getLogger("tadrop")

STATE_DIR = ".tadrop"
RUN_FORMAT = 1


class RunError(RuntimeError):
    """The run cannot start or continue (output directory conflicts, changed inputs, ...)."""


# -- identity ----------------------------------------------------------------------------------------
def fingerprints(base: Checkpoint, models: list[Checkpoint]) -> dict:
    return {"base": sources.fingerprint(base), **{m.name: sources.fingerprint(m) for m in models}}


def run_identity(cfg: MergeConfig, fps: dict) -> str:
    blob = json.dumps({"format": RUN_FORMAT, "config": cfg.identity(), "inputs": fps},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def _differences(old: dict, new: dict, what: str) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{what} {key}: was {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
    return diffs


# -- output directory --------------------------------------------------------------------------------
def _input_roots(cfg: MergeConfig) -> list[Path]:
    refs = [cfg.base, *[m.path or m.adapter for m in cfg.models]]
    return [Path(p).resolve() for p in refs if sources.parse_repo_id(str(p)) is None]   # repo ids: the HF cache


def check_output_dir(cfg: MergeConfig) -> Path:
    """Refuse an output that is, contains or lies inside an input; never touch inputs."""
    out = Path(cfg.output).resolve()
    for root in _input_roots(cfg):
        if out == root or root.is_relative_to(out) or out.is_relative_to(root):
            raise RunError(f"output directory {out} overlaps the input {root}: choose another output")
    if out.exists() and not out.is_dir():
        raise RunError(f"output {out} exists and is not a directory")
    return out


def _refuse_foreign(out: Path) -> None:
    """A directory with files but no run.json is not ours (`.tadrop/` alone is our lock)."""
    if (out.is_dir() and not (out / "run.json").exists()
            and any(p.name != STATE_DIR for p in out.iterdir())):
        raise RunError(f"output directory {out} is not empty and holds no tadrop run (no run.json): "
                       "refusing to write into it")


def claim_run_dir(out: Path, cfg: MergeConfig, run_id: str, fps: dict) -> dict:
    """Create or re-open the run directory; refuse one that holds something else."""
    record_path = out / "run.json"
    if record_path.exists():
        try:
            record = integrity.read_json(record_path)
        except integrity.StateError as e:
            raise RunError(f"{e}; not resuming over it") from None
        if record.get("run_id") != run_id:
            diffs = _differences(record.get("identity", {}), cfg.identity(), "config")
            diffs += _differences(record.get("inputs", {}), fps, "input")
            detail = "\n  ".join(diffs[:20]) or "(format version differs)"
            raise RunError(f"output directory {out} holds another run ({record.get('run_id')}); "
                           f"this config/inputs differ:\n  {detail}\n"
                           "use another output directory, or delete that run")
        return record
    _refuse_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "format": RUN_FORMAT, "run_id": run_id, "complete": False,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_json(), "identity": cfg.identity(), "inputs": fps,
        "versions": versions(), "timings": {},
    }
    atomic_write_json(record_path, record)
    return record


def versions() -> dict:
    import safetensors
    import torch
    import zarr
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("tadrop-merge")
    except PackageNotFoundError:
        ours = "dev"
    from tadrop import native
    return {"tadrop": ours, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__, "zarr": zarr.__version__,
            "native_kernels": native.where()}


# -- the merge -----------------------------------------------------------------------------------------
def open_inputs(cfg: MergeConfig) -> tuple[Checkpoint, list]:
    """The base and the K fine-tunes (checkpoints or LoRA adapters), adapters bound to the base."""
    base, models = sources.open_inputs(cfg)
    problems = sources.check_adapters(cfg, base, models)
    if len(problems) == 1:
        raise CheckpointError(problems[0])
    if problems:
        raise CheckpointError(_summarize("adapters do not fit the base", problems))
    return base, models


def cap_workers(cfg: MergeConfig, jobs_left: int, jobs_total: int | None = None) -> MergeConfig:
    """No more workers than jobs left, than this machine's cores, or than its memory holds at
    `memory_budget` each (local executor; a Ray cluster is capped at the job count only)."""
    limits = {"jobs to run": max(1, jobs_left)}
    if cfg.executor == "local":
        limits.update(machine_limits(cfg.memory_budget))
    why, cap = min(limits.items(), key=lambda kv: kv[1])
    if cfg.workers > cap:
        # fewer jobs left than workers on a resume is normal; more workers than the whole run has jobs,
        # cores or memory for is worth a warning
        loud = why != "jobs to run" or cfg.workers > (jobs_total or jobs_left)
        (log.warning if loud else log.info)("workers: %d capped at %d (%s)", cfg.workers, cap, why)
        return cfg.model_copy(update={"workers": cap})
    return cfg


def check_free_space(plan: Plan, out_dir: Path, state: Path, k: int) -> None:
    """Refuse up front a run the disk cannot hold (a full disk mid-run stays resumable)."""
    need = integrity.bytes_to_write(plan, out_dir, state, k)
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise RunError(f"not enough free space for {out_dir}: the run writes about {_gb(need)} more, "
                       f"{_gb(free)} available")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def make_executor(cfg: MergeConfig, input_bytes: int | None = None) -> Executor:
    if cfg.executor == "ray":
        from cluster.ray_executor import RayExecutor  # lazily: pipeline never needs Ray otherwise
        return RayExecutor.from_config(cfg)
    if input_bytes is None:
        return LocalExecutor(workers=cfg.workers)
    return local_executor(cfg.workers, input_bytes)


def merge(cfg: MergeConfig, *, dry_run: bool = False, quiet: bool = False,
          executor: Executor | None = None, out=sys.stdout, verify_inputs: bool = False) -> Path | None:
    """Run (or resume, or repair) a merge; returns the run directory, or None for a dry run.

    The driver holds the run's exclusive lock from before it reads run.json until the run is
    complete: one writer per run directory."""
    t_start = time.time()
    out_dir = check_output_dir(cfg)
    check_device(cfg)
    base, models = open_inputs(cfg)
    vocab = sources.plan_vocab(cfg, base, models)
    table = validate_inputs(base, models, cfg.passthrough, frozenset(vocab.rows) if vocab else frozenset())
    plan = make_plan(cfg, base, models, table, vocab=vocab)
    if dry_run:
        print(describe(plan, base), file=out)
        return None
    _refuse_foreign(out_dir)
    with integrity.RunLock(out_dir, exclusive=True, command="merge"):
        return _merge_locked(cfg, plan, base, models, out_dir, t_start, quiet=quiet,
                             executor=executor, verify_inputs=verify_inputs)


def _merge_locked(cfg: MergeConfig, plan: Plan, base: Checkpoint, models: list[Checkpoint], out_dir: Path,
                  t_start: float, *, quiet: bool, executor: Executor | None, verify_inputs: bool) -> Path:
    fps = fingerprints(base, models)
    run_id = run_identity(cfg, fps)
    record = claim_run_dir(out_dir, cfg, run_id, fps)
    if verify_inputs:
        record = _verify_inputs(out_dir, cfg, record)
    state = out_dir / STATE_DIR
    state.mkdir(exist_ok=True)
    ledger = Ledger(state / "ledger.jsonl")
    if record.get("complete"):
        report = integrity.verify(out_dir)
        if report.ok:
            log.info("run %s in %s is already complete and intact; nothing to do", run_id, out_dir)
            return out_dir
        log.warning("run %s is damaged (%d problem(s)):\n  %s\nrepairing: redoing %d job(s)%s",
                    run_id, len(report.problems), report.summary(), len(report.jobs),
                    (": " + ", ".join(sorted(report.jobs))) if report.jobs else " (the reduce only)")
        integrity.reopen(out_dir, state, ledger, report)
        record = integrity.read_json(out_dir / "run.json")

    atomic_write_json(state / "plan.json", {
        "run_id": run_id, "summary": plan.summary(),
        "jobs": [{"id": j.id, "bytes": j.nbytes} for j in plan.all_jobs],
    })
    done = ledger.done()
    if done:
        log.info("resuming run %s: %d of %d jobs already done", run_id, len(done), len(plan.all_jobs))
    crash_point("after_plan")
    reducing = (state / "reduce.json").exists()  # once the reduce has begun, the partial outputs are its own
    if not reducing:
        integrity.unpublish(out_dir, state)   # an interrupted repair
        lost = integrity.lost_jobs(plan, state, done)
        if lost:
            log.warning("%d finished job(s) lost their outputs; redoing them: %s", len(lost),
                        "; ".join(f"{j} ({why})" for j, why in sorted(lost.items())[:5])
                        + (" ..." if len(lost) > 5 else ""))
            ledger.invalidate(lost)
            for j in lost:
                done.pop(j, None)
        check_free_space(plan, out_dir, state, len(models))
        _prepare_outputs(plan, state, len(models))
    timings = dict(record.get("timings", {}))
    timings["plan_s"] = round(time.time() - t_start, 3)

    ctx = RunContext(
        state_dir=state, base=base, models=tuple(models), spec=plan.spec,
        tensor_plans=plan.tensor_plans, merged_plan=plan.merged_plan, unified_plan=plan.unified_plan,
        merged_dtypes=plan.merged_dtypes, unified_dtypes=plan.unified_dtypes,
        write_masks=plan.write_masks, device=cfg.device, model_scope=plan.model_scope,
        clamp_overflow=cfg.clamp_overflow,
        vocab=plan.vocab if plan.vocab is not None and plan.vocab.extended else None,
        input_bytes=sum(j.nbytes for j in plan.jobs["merge"]),
    )
    own_executor = executor is None
    if own_executor:
        left = max((sum(1 for j in jobs if j.id not in done) for jobs in plan.jobs.values()), default=0)
        total = max((len(jobs) for jobs in plan.jobs.values()), default=0)
        executor = make_executor(cap_workers(cfg, left, total), sum(j.nbytes for j in plan.all_jobs))
    if executor.driver_syncs:
        ctx = dataclasses.replace(ctx, sync_in_driver=True)
    progress = Progress(plan.all_jobs, done, disable=quiet)
    executor.on_status = progress.note
    try:
        t_map = time.time()
        if not reducing:
            if plan.model_scope:
                _model_scope_phases(plan, ctx, executor, ledger, done, progress)
            _run_phase(executor, ctx, plan.jobs["merge"], ledger, done, progress)
        timings["map_s"] = round(time.time() - t_map, 3)
        timings.update({f"executor_{k}": v for k, v in getattr(executor, "timings", {}).items()})
    except WorkerLost:
        changed = integrity.changed_inputs([base, *models])
        if changed:
            raise RunError(f"an input changed during the merge: {changed[0]}; the merge cannot use it: "
                           "restore the file (then re-run to resume) or start a new run") from None
        raise
    finally:
        progress.close()
        if own_executor:
            executor.close()

    t_reduce = time.time()
    results = ledger.done()
    reduce_run(out_dir, state, plan, cfg, base, results, models)
    checksums = _output_checksums(out_dir, plan, results)
    timings["reduce_s"] = round(time.time() - t_reduce, 3)
    crash_point("before_complete")
    timings["total_s"] = round(time.time() - t_start, 3)
    record = integrity.read_json(out_dir / "run.json")
    record.update(complete=True, timings=timings, plan=plan.summary(), checksums=checksums,
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(out_dir / "run.json", record)
    log.info("run %s complete in %.1f s: %s", run_id, timings["total_s"], out_dir)
    return out_dir


def _output_checksums(out_dir: Path, plan: Plan, results: dict) -> dict:
    shard_files = {out: [(s.filename, s.file_size, len(s.header)) for s in sp.shards]
                   for out, sp in (("merged", plan.merged_plan), ("unified", plan.unified_plan)) if sp}
    arrays = [encode_array_name(n) for n in plan.merge] if plan.write_masks else []
    return integrity.output_checksums(out_dir, results, shard_files, arrays)


def _verify_inputs(out_dir: Path, cfg: MergeConfig, record: dict) -> dict:
    """--verify-inputs: hash every input file; refuse inputs whose bytes changed since the hashes
    were recorded (mtime and size can be restored; bytes cannot), else record them."""
    t = time.time()
    hashes = integrity.hash_inputs(cfg.to_json())
    log.info("hashed the inputs in %.1f s", time.time() - t)
    want = record.get("input_hashes")
    if want:
        changed = [label for label, h in hashes.items() if want.get(label) not in (None, h)]
        if changed:
            raise RunError(f"input {changed[0]} changed since run {record.get('run_id')} recorded its hash"
                           + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
                           + "; use another output directory for the new inputs")
        if all(label in want for label in hashes):
            return record
    elif record.get("complete"):
        log.warning("run %s has no input hashes; recording the current inputs' hashes", record.get("run_id"))
    record = {**record, "input_hashes": {**(want or {}), **hashes}}
    atomic_write_json(out_dir / "run.json", record)
    return record


def _prepare_outputs(plan: Plan, state: Path, k: int) -> None:
    """Create shard files (headers + final size) and the Zarr arrays before any job writes into them."""
    if plan.merged_plan:
        create_shard_files(plan.merged_plan, state / "merged.partial")
    if plan.unified_plan:
        create_shard_files(plan.unified_plan, state / "unified.partial")
    if plan.write_masks:
        arrays = {n: (k, plan.shapes[n], mask_chunk_rows(plan.shapes[n])) for n in plan.merge}
        MaskStore.create(state / "masks.zarr.partial", arrays,
                         {"tasks": list(plan.spec.task_names), "method": plan.spec.method})


def _run_phase(executor: Executor, ctx: RunContext, jobs: list[Job], ledger: Ledger, done: dict,
               progress: Progress) -> None:
    todo = [j for j in jobs if j.id not in done]
    if not todo:
        return

    durable = Durability(ctx) if ctx.sync_in_driver else None

    def on_result(job: Job, result: dict) -> None:
        for w in result.get("warnings", ()) if isinstance(result, dict) else ():
            log.warning(w)
        if durable is not None:       # the job's outputs reach the disk before the ledger names it
            durable(result)
        ledger.record(job.id, result)
        done[job.id] = result
        progress.advance(job)
        crash_point("after_job")

    try:
        executor.run(ctx, todo, on_result)
    finally:
        if durable is not None:
            durable.close()


def _model_scope_phases(plan: Plan, ctx: RunContext, executor: Executor, ledger: Ledger, done: dict,
                        progress: Progress) -> None:
    """Model scope: per-task statistics over the whole model, in two histogram passes before the merge."""
    k = len(ctx.models)
    gdir = ctx.global_dir
    gdir.mkdir(exist_ok=True)

    _run_phase(executor, ctx, plan.jobs["global_hi"], ledger, done, progress)
    sels = merge_selector_files([ctx.state_dir / done[j.id]["file"] for j in plan.jobs["global_hi"]], k)
    streamed.global_select(plan.spec, sels)
    crash_point("global_select")      # every pass-1 job recorded, selected.npz not yet written
    save_selectors(gdir / SELECTED_FILE, sels)
    crash_point("global_selected")

    _run_phase(executor, ctx, plan.jobs["global_lo"], ledger, done, progress)
    lo = merge_selector_files([ctx.state_dir / done[j.id]["file"] for j in plan.jobs["global_lo"]], k)
    for s, part in zip(sels, lo):
        s.merge_lo(part)
    if plan.jobs.get("global_thr"):     # global_threshold: a third pass only where the bracket missed
        thr_jobs = plan.jobs["global_thr"]
        extra = streamed.global_extra_ranks(plan.spec, sels)
        if any(extra):
            save_ranks(gdir / EXTRA_FILE, extra)
            _run_phase(executor, ctx, thr_jobs, ledger, done, progress)
            more = merge_selector_files([ctx.state_dir / done[j.id]["file"] for j in thr_jobs], k)
            for s, part in zip(sels, more):
                s.merge_lo(part)
        else:
            for j in thr_jobs:
                if j.id not in done:
                    ledger.record(j.id, {"skipped": True})
                    done[j.id] = {"skipped": True}
                    progress.advance(j)
    values = streamed.global_values(plan.spec, sels)
    crash_point("global_values_pending")
    save_values(gdir / VALUES_FILE, values)
    crash_point("global_values")
    if plan.jobs.get("global_sign"):     # inner ties_official: the model-wide majority sign
        _run_phase(executor, ctx, plan.jobs["global_sign"], ledger, done, progress)
        total = sum(int(done[j.id]["sign_sum"]) for j in plan.jobs["global_sign"])
        save_majority(gdir / MAJORITY_FILE, float((total > 0) - (total < 0)))


# -- status ----------------------------------------------------------------------------------------------
def status(run_dir: Path, out=sys.stdout) -> int:
    """Print progress; 0 complete, 3 incomplete (or running), 2 not a run, 1 complete but damaged."""
    run_dir = Path(run_dir)
    try:
        record = integrity.read_json(run_dir / "run.json")
        run_id = record["run_id"]
    except (integrity.StateError, KeyError):
        print(f"{run_dir}: not a tadrop run (no readable run.json)", file=out)
        return 2
    plan_file = run_dir / STATE_DIR / "plan.json"
    jobs = integrity.read_json(plan_file, " (plan.json)").get("jobs", []) if plan_file.exists() else []
    if not isinstance(jobs, list) or not all(isinstance(j, dict) and isinstance(j.get("bytes"), int)
                                             for j in jobs):
        raise integrity.StateError(f"{plan_file}: corrupt (plan.json jobs)")
    done = Ledger(run_dir / STATE_DIR / "ledger.jsonl").done() if jobs else {}
    total_b = sum(j["bytes"] for j in jobs)
    done_b = sum(j["bytes"] for j in jobs if j.get("id") in done)
    n_done = sum(1 for j in jobs if j.get("id") in done)
    writer = integrity.running_writer(run_dir)
    if writer:
        state = f"running (pid {writer.get('pid')}, host {writer.get('host')})"
    else:
        state = "complete" if record.get("complete") else "incomplete"
    cfg = record.get("config", {}) if isinstance(record.get("config"), dict) else {}
    print(f"run {run_id} ({cfg.get('method')}, {len(cfg.get('models', []))} tasks): {state}", file=out)
    print(f"jobs: {n_done}/{len(jobs)} done, {done_b / 1e9:.2f}/{total_b / 1e9:.2f} GB", file=out)
    if writer:
        print(f"a {writer.get('command', 'merge')} holds the run since {writer.get('started')}", file=out)
        return 3
    if record.get("complete"):
        report = integrity.check_complete(run_dir)
        if not report.ok:
            print(f"DAMAGED: {len(report.problems)} problem(s):\n  {report.summary()}\n"
                  "re-run the same `tadrop merge` command to repair (`tadrop verify` checks every byte)",
                  file=out)
            return 1
        t = record.get("timings", {})
        print(f"finished {record.get('finished')} in {t.get('total_s', '?')} s", file=out)
        return 0
    print("re-run the same `tadrop merge` command to continue", file=out)
    return 3
