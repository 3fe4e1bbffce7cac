#!/usr/bin/env python3
"""Where a whole `tadrop merge` spends its time: a sampled profile of every process, by category.

Runs TIES and EMR + TADrop merges (K tasks, the benchmark's LLaMA-shaped checkpoints) under
  - py-spy (`record --subprocesses --nonblocking`, raw stacks of the driver and every worker),
    folded into categories by the innermost frame that names one (decode, selection, float64
    sums, the merge method, output cast, zarr masks, pwrite, fsync, start-up, reduce, ...);
  - strace -f -c on the I/O system calls only (pwrite64, fsync, fdatasync, madvise, renameat):
    the time spent inside them, which a CPU profile cannot see when a call blocks on the disk.
Writes bench/profile.json and bench/profile.md.  Samples are CPU-active samples (py-spy skips
idle threads), so shares are shares of the CPU the run used; the wall columns come from the
run's own timings (run.json) and from strace.

    python3 scripts/profile_merge.py [--k 4 --methods ties,emr_tadrop --data bench_data/models]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench_merge as bm  # noqa: E402

# (category, frame substrings); a sample goes to the first category, scanning from the innermost frame out
CATEGORIES = [
    ("fsync / syncfs (outputs durable before the ledger records a job)",
     ["ShardWriter.sync (", "_sync_chunks (", "_sync_metadata (", "fsync_dir (", "Ledger.record (",
      "Durability.__call__ (", "sync_mask_chunks (", "syncfs ("]),
    ("pwrite of output rows", ["_pwrite_all ("]),
    ("output cast to the output dtype", ["_Sink._write ("]),
    ("masks: counts, bit-pack + zstd + chunk files", ["MaskStore.write (", "zarr/", "numcodecs/",
                                                    "mask_counts (", "_Combiner._count ("]),
    ("selection (counting histograms in C / radix / numpy partition)",
     ["abs_hist_hi (", "abs_hist_lo (", "NativeOrder.", "AbsSelector.", "AbsOrder.", "_sparse_hist (",
      "whole_method (", "_calibrate ("]),
    ("float64 sums (TADrop's norms, EMR rescaler sums outside its kernel)",
     ["block_sums (", "Sum64.", "Sum64Rows.", "sumsq64 (", "sumsq64_pair (", "sum_tasks64 (",
      "f64_inplace ("]),
    ("sparsifier apply (drop, rescale)", ["shrink_scale (", "_shrink (", "TADrop.apply (", "TopK.apply (",
                                          "TADrop.fit_apply_ (", "Sparsifier.fit_apply_ ("]),
    ("decode inputs: bf16 -> f32, tau = theta_k - theta_0 (incl. mmap page faults)",
     ["_Reader.tau (", "_Reader.base (", "_Reader.chunks.", "_Reader.from_theta (", "_Reader.gather ("]),
    ("merge method kernel (TIES elect + mean / EMR elect, mask, unify + its rescaler sums)",
     ["emr_block (", "ties_block (", "_Combiner.__call__ ("]),
    ("release mapped pages (madvise)", ["JobRunner._release (", "_Source.release ("]),
    ("reduce (stats.parquet, index, rename)", ["pipeline/reduce.py"]),
    ("plan + input validation (driver)", ["pipeline/plan.py", "pipeline/checkpoints.py", "pipeline/config.py"]),
    ("start-up: interpreter, imports, worker spawn", ["_find_and_load (", "spawn_main (", "_bootstrap (",
                                                      "<module> (pipeline/cli.py"]),
    ("other merge_tensor work", ["merge_tensor ("]),
    ("executor / job plumbing", ["pipeline/executor.py", "concurrent/futures/", "multiprocessing/"]),
]
# the categories above in four groups: the maths, reading inputs, writing outputs, the rest
GROUPS = [
    ("the maths (selection, float64 sums, sparsifier apply, merge kernel)",
     ("selection", "float64 sums", "sparsifier apply", "merge method kernel")),
    ("reading inputs (decode, tau, page faults, madvise)", ("decode inputs", "release mapped pages")),
    ("writing outputs (cast, pwrite, masks, durability, reduce)",
     ("output cast", "pwrite", "masks:", "fsync", "reduce")),
    ("start-up, plan, plumbing, other merge_tensor work",
     ("start-up", "plan +", "executor", "other merge_tensor")),
]
SYSCALLS = "pwrite64,fsync,fdatasync,syncfs,madvise,renameat,renameat2,rename"


PY_FRAME = re.compile(r".+ \(.+:\d+\)$")   # "function (file.py:line)"; process labels are not


def classify(stack: str) -> str:
    frames = [f for f in stack.split(";") if PY_FRAME.match(f)]
    if not frames:
        return "no Python frame (a native thread, or a sample py-spy could not read)"
    for fr in reversed(frames):
        for cat, pats in CATEGORIES:
            if any(p in fr for p in pats):
                return cat
    return "other"


def fold(raw: Path) -> dict:
    """{category: samples} plus per-process totals from py-spy's raw (collapsed) output."""
    cats: collections.Counter = collections.Counter()
    procs: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        n = int(n)
        labels = [f for f in stack.split(";") if not PY_FRAME.match(f)]   # process labels (may hold ';')
        last = labels[-1] if labels else ""
        if "multiprocessing-fork" in last or "spawn_main" in last:
            procs["workers"] += n
        elif "pipeline.cli" in last:
            procs["driver"] += n
        else:                    # the strace process itself: profiler overhead, left out of the shares
            procs["profiler"] += n
            continue
        cats[classify(stack)] += n
    return {"categories": dict(cats), "processes": dict(procs), "samples": sum(cats.values())}


def strace_summary(path: Path) -> dict:
    """{syscall: {'seconds': s, 'calls': n}} from `strace -c` output."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+([\d.]+)\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m:
            out[m.group(3)] = {"seconds": float(m.group(1)), "calls": int(m.group(2))}
    return out


def run_one(method: str, k: int, man: dict, args, work: Path) -> dict:
    case = bm.Case("tadrop", method, k)
    run_dir = work / f"run-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = work / f"{method}.yaml"
    cfg.write_text(bm.tadrop_config(case, man, run_dir))
    raw, st = work / f"{method}.pyspy.txt", work / f"{method}.strace.txt"
    merge = [sys.executable, "-m", "pipeline.cli", "merge", str(cfg), "--workers", str(args.workers),
             "--memory-budget", args.memory_budget, "--quiet"]
    cmd = ["py-spy", "record", "--subprocesses", "--nonblocking", "--rate", str(args.rate), "--format", "raw",
           "-o", str(raw), "--", "strace", "-f", "-c", "-w", "--seccomp-bpf", "-o", str(st), "-e", f"trace={SYSCALLS}", *merge]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.cold:
        bm.drop_caches()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{method}: merge under the profiler failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    timings = json.loads((run_dir / "run.json").read_text())["timings"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"method": method, "k": k, "wall_s": round(wall, 2), "timings": timings,
            "profile": fold(raw), "syscalls": strace_summary(st)}


def render(res: dict) -> str:
    env = res["environment"]
    lines = ["# Profile of whole merges (scripts/profile_merge.py)", "",
             f"{res['date']}, CPU **{env['cpu_model']}**, {env['cpu_count']} cores, shared: load average "
             f"{env['loadavg_before'][0]:.1f} before, {env['loadavg_after'][0]:.1f} after. "
             f"`tadrop merge --workers {res['workers']} --memory-budget {res['memory_budget']}`, K = {res['k']}, "
             f"the benchmark's LLaMA-shaped bf16 checkpoints ({res['model_gb']:.2f} GB each), page cache "
             f"{'cold' if res['cold'] else 'warm'}. Profiling slows a run (py-spy at {res['rate']} Hz, strace "
             "on the I/O calls), so read shares, not seconds.", "",
             "## CPU samples by category (share of the run's CPU-active samples, all processes)", ""]
    runs = res["runs"]
    head = "| category | " + " | ".join(r["method"] for r in runs) + " |"
    lines += [head, "| --- |" + " ---: |" * len(runs)]
    cats = [c for c, _ in CATEGORIES] + ["no Python frame (a native thread, or a sample py-spy could not read)",
                                         "other"]
    for c in cats:
        vals = [r["profile"]["categories"].get(c, 0) / max(1, r["profile"]["samples"]) for r in runs]
        if any(v >= 0.001 for v in vals):
            lines.append(f"| {c} | " + " | ".join(f"{v:.1%}" for v in vals) + " |")
    groups = [(g, [c for c, _ in CATEGORIES if any(c.startswith(p) for p in pre)]) for g, pre in GROUPS]
    lines += ["", "Grouped (the same samples):", "", head, "| --- |" + " ---: |" * len(runs)]
    for g, members in groups:
        vals = [sum(r["profile"]["categories"].get(c, 0) for c in members) / max(1, r["profile"]["samples"])
                for r in runs]
        lines.append(f"| {g} | " + " | ".join(f"{v:.1%}" for v in vals) + " |")
    lines += ["", "| samples (driver / workers) | " + " | ".join(
        f"{r['profile']['processes'].get('driver', 0)} / {r['profile']['processes'].get('workers', 0)}"
        for r in runs) + " |", "",
        "## Wall time", "",
        "| | " + " | ".join(r["method"] for r in runs) + " |", "| --- |" + " ---: |" * len(runs)]
    for key, label in (("wall_s", "whole command under the profilers, s"),):
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:.1f}" for r in runs) + " |")
    for key in ("plan_s", "map_s", "reduce_s", "total_s"):
        lines.append(f"| run.json {key} | " + " | ".join(str(r["timings"].get(key, "-")) for r in runs) + " |")
    sys_names = sorted({s for r in runs for s in r["syscalls"]} - {"total"})
    for s in sys_names:
        lines.append(f"| inside {s}: s (calls), summed over processes | " + " | ".join(
            f"{r['syscalls'].get(s, {}).get('seconds', 0):.2f} ({r['syscalls'].get(s, {}).get('calls', 0)})"
            for r in runs) + " |")
    lines += ["", *res.get("notes", []), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench_data" / "models")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--methods", default="ties,emr_tadrop")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-budget", default="2GiB")
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each merge (if permitted)")
    ap.add_argument("--work", type=Path, default=REPO / "bench_data" / "profile")
    ap.add_argument("--out", type=Path, default=REPO / "bench")
    ap.add_argument("--note", action="append", default=[], help="a line to add under the tables")
    ap.add_argument("--report-only", action="store_true",
                    help="re-fold the raw profiles under --work into --out/profile.{json,md}")
    args = ap.parse_args(argv)
    if args.report_only:
        res = json.loads((args.out / "profile.json").read_text())
        for r in res["runs"]:
            r["profile"] = fold(args.work / f"{r['method']}.pyspy.txt")
        res["notes"] = res.get("notes", []) + args.note
        (args.out / "profile.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "profile.md").write_text(render(res))
        return 0
    for tool in ("py-spy", "strace"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: pip install py-spy / apt-get install strace")
    man = json.loads((args.data / "demo_models.json").read_text())
    args.work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    runs = [run_one(m, args.k, man, args, args.work) for m in args.methods.split(",")]
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "k": args.k, "workers": args.workers,
           "memory_budget": args.memory_budget, "rate": args.rate, "cold": args.cold,
           "model_gb": man["total_size"] / 1e9, "runs": runs, "notes": args.note,
           "environment": {"cpu_model": bm.cpu_model(), "cpu_count": os.cpu_count(),
                           "python": platform.python_version(), "loadavg_before": list(load0),
                           "loadavg_after": list(os.getloadavg())}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "profile.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
