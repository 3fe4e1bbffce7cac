"""Drives the real product: writes a merge config, runs `tadrop merge`, and
`tadrop export` for the per-task methods (EMR, TALL masks).

The CLI runs as `python -m pipeline.cli` from this working tree, so the
benchmark always measures the code next to it, not an older installed copy.
Every command and its output go to WORK/logs/, and a failure raises with the
command's stderr so the benchmark names the exact failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO / "scripts"))
from eval_common import run_complete  # noqa: E402  (shared with scripts/eval_llm)

# Frozen word embeddings (zero task vectors), the int position ids buffer and
# the pooler (mean pooling never trains it) are copied from the base.
PASSTHROUGH = ["embeddings.word_embeddings.weight", "embeddings.position_ids", "pooler.*"]
PER_TASK_METHODS = ("emr", "tall_masks")


class CLIError(RuntimeError):
    pass


def tadrop(*args, log: Path, timeout: int = 1800) -> str:
    cmd = [sys.executable, "-m", "pipeline.cli", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n# rc={proc.returncode} {time.time() - t0:.1f}s\n"
                f"{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise CLIError(f"`tadrop {' '.join(map(str, args))}` exited {proc.returncode}:\n"
                       f"{proc.stderr.strip()[-3000:]}")
    return proc.stdout


def write_config(path: Path, base: Path, models: dict[str, Path], spec: dict, output: Path,
                 workers: int = 2) -> Path:
    cfg = {"base": str(base),
           "models": [{"name": n, "path": str(p), "weight": 1.0} for n, p in models.items()],
           **spec, "passthrough": PASSTHROUGH, "output": str(output),
           "workers": workers, "memory_budget": "2GiB"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def merge(label: str, spec: dict, base: Path, models: dict[str, Path], work: Path,
          workers: int = 2) -> Path:
    """Run (or reuse, when complete with the same config) the merge `spec`; return RUN."""
    run = work / "runs" / label
    cfg = write_config(work / "configs" / f"{label}.yaml", base, models, spec, run, workers)
    stamp = run / "bench_config.yaml"
    if stamp.exists() and stamp.read_text() == cfg.read_text() and run_complete(run):
        return run
    if run.exists():
        shutil.rmtree(run)
    t0 = time.time()
    tadrop("merge", cfg, "--quiet", log=work / "logs" / f"{label}.log")
    if not run_complete(run):
        raise CLIError(f"`tadrop merge {cfg}` exited 0 but {run}/run.json is not complete")
    for must in ["stats.parquet", "run.json"]:
        if not (run / must).exists():
            raise CLIError(f"`tadrop merge {cfg}` left no {must} in {run}")
    shutil.copyfile(cfg, stamp)
    (run / "bench_timing.json").write_text(json.dumps({"merge_s": round(time.time() - t0, 2)}))
    return run


def export(run: Path, task: str, out: Path, log: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tadrop("export", run, "--task", task, "--output", out, log=log)
    return out


def drop_outputs(run: Path) -> None:
    """Free the disk of a selection run once scored (keep stats, config, run.json)."""
    for sub in ("merged", "unified", "masks.zarr", ".tadrop"):
        shutil.rmtree(run / sub, ignore_errors=True)
