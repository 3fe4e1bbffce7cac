"""The driver: validate -> identify the run (resume or refuse) -> plan -> phases on an executor -> reduce.

A run directory is claimed by `run.json` (written before any work, `"complete": false`); the ledger
in `.tadrop/` records finished jobs; the reduce renames the finished outputs into place and only
then sets `"complete": true`. Re-running the same command therefore continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tadrop import streamed

from .checkpoints import Checkpoint, validate_inputs
from .config import MergeConfig
from .executor import Executor, LocalExecutor
from .faults import crash_point
from .globalstats import (EXTRA_FILE, SELECTED_FILE, VALUES_FILE, merge_selector_files, save_ranks,
                          save_selectors, save_values)
from .job import Job, RunContext
from .ledger import Ledger
from .plan import Plan, describe, make_plan, mask_chunk_rows
from .progress import Progress
from .reduce import reduce_run
from .writers import MaskStore, atomic_write_json, create_shard_files

log = logging.getLogger("tadrop")

STATE_DIR = ".tadrop"
RUN_FORMAT = 1


class RunError(RuntimeError):
    """The run cannot start or continue (output directory conflicts, changed inputs, ...)."""


# -- identity ----------------------------------------------------------------------------------------
def fingerprints(base: Checkpoint, models: list[Checkpoint]) -> dict:
    return {"base": base.fingerprint(), **{m.name: m.fingerprint() for m in models}}


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
    return [Path(p).resolve() for p in [cfg.base, *[m.path for m in cfg.models]]]


def check_output_dir(cfg: MergeConfig) -> Path:
    """Refuse an output that is, contains or lies inside an input; never touch inputs."""
    out = Path(cfg.output).resolve()
    for root in _input_roots(cfg):
        if out == root or root.is_relative_to(out) or out.is_relative_to(root):
            raise RunError(f"output directory {out} overlaps the input {root}: choose another output")
    if out.exists() and not out.is_dir():
        raise RunError(f"output {out} exists and is not a directory")
    return out


def claim_run_dir(out: Path, cfg: MergeConfig, run_id: str, fps: dict) -> dict:
    """Create or re-open the run directory; refuse one that holds something else."""
    record_path = out / "run.json"
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{record_path} is unreadable ({e}); not resuming over it") from None
        if record.get("run_id") != run_id:
            diffs = _differences(record.get("identity", {}), cfg.identity(), "config")
            diffs += _differences(record.get("inputs", {}), fps, "input")
            detail = "\n  ".join(diffs[:20]) or "(format version differs)"
            raise RunError(f"output directory {out} holds another run ({record.get('run_id')}); "
                           f"this config/inputs differ:\n  {detail}\n"
                           "use another output directory, or delete that run")
        return record
    if out.exists() and any(out.iterdir()):
        raise RunError(f"output directory {out} is not empty and holds no tadrop run (no run.json): "
                       "refusing to write into it")
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
    return {"tadrop": ours, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__, "zarr": zarr.__version__}


# -- the merge -----------------------------------------------------------------------------------------
def open_inputs(cfg: MergeConfig) -> tuple[Checkpoint, list[Checkpoint]]:
    base = Checkpoint.open(cfg.base, "base")
    models = [Checkpoint.open(m.path, m.name) for m in cfg.models]
    return base, models


def make_executor(cfg: MergeConfig) -> Executor:
    if cfg.executor == "ray":
        from cluster.ray_executor import RayExecutor  # lazily: pipeline never needs Ray otherwise
        return RayExecutor.from_config(cfg)
    return LocalExecutor(workers=cfg.workers)


def merge(cfg: MergeConfig, *, dry_run: bool = False, quiet: bool = False,
          executor: Executor | None = None, out=sys.stdout) -> Path | None:
    """Run (or resume) a merge; returns the run directory, or None for a dry run."""
    t_start = time.time()
    out_dir = check_output_dir(cfg)
    base, models = open_inputs(cfg)
    table = validate_inputs(base, models, cfg.passthrough)
    plan = make_plan(cfg, base, models, table)
    if dry_run:
        print(describe(plan, base), file=out)
        return None

    fps = fingerprints(base, models)
    run_id = run_identity(cfg, fps)
    record = claim_run_dir(out_dir, cfg, run_id, fps)
    if record.get("complete"):
        log.info("run %s in %s is already complete; nothing to do", run_id, out_dir)
        return out_dir

    state = out_dir / STATE_DIR
    state.mkdir(exist_ok=True)
    atomic_write_json(state / "plan.json", {
        "run_id": run_id, "summary": plan.summary(),
        "jobs": [{"id": j.id, "bytes": j.nbytes} for j in plan.all_jobs],
    })
    ledger = Ledger(state / "ledger.jsonl")
    done = ledger.done()
    if done:
        log.info("resuming run %s: %d of %d jobs already done", run_id, len(done), len(plan.all_jobs))
    crash_point("after_plan")
    reducing = (state / "reduce.json").exists()  # once the reduce has begun, the partial outputs are its own
    if not reducing:
        _prepare_outputs(plan, state, len(models))
    timings = dict(record.get("timings", {}))
    timings["plan_s"] = round(time.time() - t_start, 3)

    ctx = RunContext(
        state_dir=state, base=base, models=tuple(models), spec=plan.spec,
        tensor_plans=plan.tensor_plans, merged_plan=plan.merged_plan, unified_plan=plan.unified_plan,
        merged_dtypes=plan.merged_dtypes, unified_dtypes=plan.unified_dtypes,
        write_masks=plan.write_masks, device=cfg.device, model_scope=plan.model_scope,
    )
    own_executor = executor is None
    executor = executor or make_executor(cfg)
    progress = Progress(plan.all_jobs, done, disable=quiet)
    try:
        t_map = time.time()
        if not reducing:
            if plan.model_scope:
                _model_scope_phases(plan, ctx, executor, ledger, done, progress)
            _run_phase(executor, ctx, plan.jobs["merge"], ledger, done, progress)
        timings["map_s"] = round(time.time() - t_map, 3)
        timings.update({f"executor_{k}": v for k, v in getattr(executor, "timings", {}).items()})
    finally:
        progress.close()
        if own_executor:
            executor.close()

    t_reduce = time.time()
    results = ledger.done()
    reduce_run(out_dir, state, plan, cfg, base, results)
    timings["reduce_s"] = round(time.time() - t_reduce, 3)
    crash_point("before_complete")
    timings["total_s"] = round(time.time() - t_start, 3)
    record = json.loads((out_dir / "run.json").read_text())
    record.update(complete=True, timings=timings, plan=plan.summary(),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(out_dir / "run.json", record)
    log.info("run %s complete in %.1f s: %s", run_id, timings["total_s"], out_dir)
    return out_dir


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

    def on_result(job: Job, result: dict) -> None:
        ledger.record(job.id, result)
        done[job.id] = result
        progress.advance(job)
        crash_point("after_job")

    executor.run(ctx, todo, on_result)


def _model_scope_phases(plan: Plan, ctx: RunContext, executor: Executor, ledger: Ledger, done: dict,
                        progress: Progress) -> None:
    """Model scope: per-task statistics over the whole model, in two histogram passes before the merge."""
    k = len(ctx.models)
    gdir = ctx.global_dir
    gdir.mkdir(exist_ok=True)

    _run_phase(executor, ctx, plan.jobs["global_hi"], ledger, done, progress)
    sels = merge_selector_files([ctx.state_dir / done[j.id]["file"] for j in plan.jobs["global_hi"]], k)
    streamed.global_select(plan.spec, sels)
    save_selectors(gdir / SELECTED_FILE, sels)

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
    save_values(gdir / VALUES_FILE, values)


# -- status ----------------------------------------------------------------------------------------------
def status(run_dir: Path, out=sys.stdout) -> int:
    """Print progress; 0 complete, 3 incomplete, 2 not a run."""
    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / "run.json").read_text())
        run_id = record["run_id"]
    except (OSError, ValueError, KeyError):
        print(f"{run_dir}: not a tadrop run (no readable run.json)", file=out)
        return 2
    plan_file = run_dir / STATE_DIR / "plan.json"
    jobs = json.loads(plan_file.read_text())["jobs"] if plan_file.exists() else []
    done = Ledger(run_dir / STATE_DIR / "ledger.jsonl").done() if jobs else {}
    total_b = sum(j["bytes"] for j in jobs)
    done_b = sum(j["bytes"] for j in jobs if j["id"] in done)
    n_done = sum(1 for j in jobs if j["id"] in done)
    state = "complete" if record.get("complete") else "incomplete"
    cfg = record.get("config", {})
    print(f"run {run_id} ({cfg.get('method')}, {len(cfg.get('models', []))} tasks): {state}", file=out)
    print(f"jobs: {n_done}/{len(jobs)} done, {done_b / 1e9:.2f}/{total_b / 1e9:.2f} GB", file=out)
    if record.get("complete"):
        t = record.get("timings", {})
        print(f"finished {record.get('finished')} in {t.get('total_s', '?')} s", file=out)
        return 0
    print("re-run the same `tadrop merge` command to continue", file=out)
    return 3

