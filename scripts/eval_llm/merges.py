"""Drives the real product through its Python API (the `pipeline` package the
CLI wraps): writes a merge config, runs `pipeline.run.merge`, and
`pipeline.export.export_task` for the per-task methods (EMR, TALL masks).

In-process rather than `python -m pipeline.cli` because a CLI call pays ~3 s
of torch import per merge on this machine and the benchmark runs ~150 merges;
the config file, the run directory and the exported checkpoints are the same
as the CLI's (`tadrop merge CONFIG`, `tadrop export RUN --task T`). The
package is imported from this working tree (scripts/eval_llm/../..), so the
benchmark measures the code next to it.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "scripts"))
from eval_common import merge_seconds, run_complete as complete  # noqa: E402,F401  (shared with scripts/eval)

PER_TASK_METHODS = ("emr", "tall_masks")


def supports(spec: dict, tasks: list[str]) -> str | None:
    """None when the product's config accepts `spec` (for these task names), else
    the reason it does not (a feature not landed yet): the benchmark then lists
    the row as not run instead of failing."""
    from pydantic import ValidationError

    from pipeline.config import MergeConfig
    probe = {"base": "/nonexistent", "models": [{"name": t, "path": "/nonexistent"} for t in tasks],
             "output": "/nonexistent", **spec}
    try:
        MergeConfig.model_validate(probe)
    except ValidationError as e:
        return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())[:200]
    return None


class InProcessExecutor:
    """Runs a merge's jobs in this process, through the same `JobRunner` the
    local executor's workers use (`pipeline.run.merge(cfg, executor=...)`).

    Why: on this shared 2-core machine a worker pool's start-up (a fresh
    interpreter importing torch) costs 5-15 s per merge, more than merging a
    few-MB model; the jobs, their outputs and the reduce are unchanged."""

    def __new__(cls):
        from pipeline.executor import Executor
        from pipeline.job import JobError, JobRunner

        class _Inline(Executor):
            timings: dict = {}

            def run(self, ctx, jobs, on_result):
                runner = JobRunner(ctx)
                for job in jobs:
                    try:
                        result = runner.run(job)
                    except JobError:
                        raise
                    except Exception as e:   # as LocalExecutor reports a worker's error
                        raise JobError(f"{job.describe()}: {type(e).__name__}: {e}") from e
                    on_result(job, result)

        return _Inline()


def write_config(path: Path, base: Path, models: list[dict], spec: dict, output: Path) -> Path:
    cfg = {"base": str(base), "models": models, **spec, "output": str(output),
           "workers": 1, "memory_budget": "1GiB"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def merge(label: str, spec: dict, base: Path, models: list[dict], work: Path) -> Path:
    """Run (or reuse, when complete with the same config) the merge `spec`; return RUN."""
    from pipeline.config import load_config
    from pipeline.run import merge as run_merge
    run = work / "runs" / label
    cfg_path = write_config(work / "configs" / f"{label}.yaml", base, models, spec, run)
    stamp = run / "bench_config.yaml"
    if stamp.exists() and stamp.read_text() == cfg_path.read_text() and complete(run):
        return run
    if run.exists():
        shutil.rmtree(run)
    t0 = time.time()
    with InProcessExecutor() as ex:
        run_merge(load_config(cfg_path), quiet=True, executor=ex)
    if not complete(run):
        raise RuntimeError(f"merge {cfg_path} returned but {run}/run.json is not complete")
    shutil.copyfile(cfg_path, stamp)
    (run / "bench_timing.json").write_text(json.dumps({"merge_s": round(time.time() - t0, 2)}))
    return run


def export(run: Path, task: str) -> Path:
    """The task's model from a per-task run (cached under RUN/bench_export/TASK)."""
    from pipeline.export import export_task
    out = run / "bench_export" / task
    if not (out / "config.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        export_task(run, task, out)
    return out
