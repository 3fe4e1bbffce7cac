#!/usr/bin/env python3
"""GPU benchmark: the engine's CUDA path against its CPU path, on the same machine, in one run.

Two parts; ratios within this run are the result (absolute figures move with the machine):

  kernel  `merge_tensor` on one LLaMA-7B MLP tensor (4096 x 11008, bf16 checkpoints) at K = 8 and 32,
          per method: the CPU path as one merge worker runs it (one torch thread, native kernels,
          a 2 GiB budget) against CUDA with the source in host memory (as a worker reads its mmaps:
          the copies in) and with the source already on the GPU (the maths alone). The sink is host
          memory in both. Same masks and kept counts (checked), merged values compared.
  merge   `tadrop merge` end to end on generated LLaMA-shaped checkpoints (hidden 4096, MLP 11008,
          bf16), `device: cpu` with one worker per core against `device: cuda`: wall, CPU time,
          peak RSS of the process tree, and how the outputs compare (mask chunks byte for byte,
          the drop table's exact columns, the values in ulp of bf16).

    python3 scripts/bench_gpu.py --out bench --stem gpu          # on a machine with a GPU
    python3 scripts/bench_gpu.py --gpu-device cpu --quick ...    # checks the script without one

Writes <out>/<stem>.json and <out>/<stem>.md; without a GPU (and no --gpu-device) it exits 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import bench_merge as bm  # noqa: E402  (run_measured, drop-in process-tree sampling)
from bench_kernels import cpu_model  # noqa: E402
import make_demo_models as mdm  # noqa: E402
from tadrop import native  # noqa: E402
from tadrop import (Identity, MemorySink, MemorySource, MergeSpec, TADrop, TopK,  # noqa: E402
                    merge_tensor, plan_tensor)

GiB = 2**30
METHODS = {   # name -> (method, sparsifier)
    "ties (top-k 0.2)": ("ties", lambda: TopK(0.2)),
    "ties + tadrop": ("ties", TADrop),
    "emr + tadrop": ("emr", TADrop),
    "task_arithmetic + tadrop": ("task_arithmetic", TADrop),
    "tall_masks": ("tall_masks", Identity),
    "consensus + tadrop": ("consensus", TADrop),
}
CPU_AT_K32 = ("ties (top-k 0.2)", "emr + tadrop", "tall_masks")   # the CPU is slow there: three are enough


def gpu_info(dev: str) -> dict:
    if torch.device(dev).type != "cuda":
        return {"name": f"(none: --gpu-device {dev})"}
    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "memory_gib": round(p.total_memory / GiB, 1), "sms": p.multi_processor_count,
            "cuda": torch.version.cuda}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- kernel part

def make_family(shape, K: int, dev: str, seed: int = 0):
    """A bf16 base and K bf16 fine-tunes whose deltas differ in scale and tail per task (as
    make_demo_models'), generated where it is fast, returned in host memory."""
    gen_dev = dev if torch.device(dev).type == "cuda" else "cpu"
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    base = (torch.randn(shape, generator=g, device=gen_dev) * 0.02).to(torch.bfloat16)
    tasks = []
    for k in range(K):
        z = torch.randn(shape, generator=g, device=gen_dev)
        heavy = 0.2 + 0.6 * k / max(K - 1, 1)                # share of the cubed (heavy-tailed) part
        d = (z * (1 - heavy) + z.pow(3) * heavy) * (2e-4 * (1 + k % 5))
        tasks.append((base.float() + d).to(torch.bfloat16).cpu())
        del z, d
    return base.cpu(), tasks


def time_merge(spec, shape, src, dev, plan, repeats) -> tuple[float, MemorySink, object]:
    best, sink, res = [], None, None
    for _ in range(repeats):
        sink = MemorySink(shape, spec.K)
        sync(dev)
        t0 = time.perf_counter()
        res = merge_tensor(spec, "model.layers.0.mlp.up_proj.weight", src, sink, plan, device=dev)
        sync(dev)
        best.append(time.perf_counter() - t0)
    return statistics.median(best), sink, res


def compare_sinks(a: MemorySink, b: MemorySink) -> dict:
    out = {"masks_equal": None, "max_abs_diff": 0.0, "bit_identical_share": None}
    if a.masks_t is not None:
        out["masks_equal"] = bool(torch.equal(a.masks_t, b.masks_t))
    same = total = 0
    for x, y in ((a.merged_t, b.merged_t), (a.unified_t, b.unified_t)):
        if x is None:
            continue
        out["max_abs_diff"] = max(out["max_abs_diff"], float((x - y).abs().max()))
        same += int((x.view(torch.int32) == y.view(torch.int32)).sum())
        total += x.numel()
    out["bit_identical_share"] = same / total if total else None
    return out


def kernel_part(args, dev: str, rows: list, save) -> list[dict]:
    """Appends a row per (K, method) to `rows`, calling `save` after each (a run cut short keeps them)."""
    shape = (args.rows, args.cols)
    n = args.rows * args.cols
    for K in args.kernel_k:
        base, tasks = make_family(shape, K, dev, seed=K)
        host = MemorySource(base, tasks)
        on_gpu = MemorySource(base.to(dev), [t.to(dev) for t in tasks])
        for name, (method, phi) in METHODS.items():
            spec = MergeSpec(method, phi(), tuple(f"task{k}" for k in range(K)))
            row = {"K": K, "method": name, "elements": n}
            try:
                gplan = plan_tensor(spec, shape, K, args.gpu_budget_gib * GiB, device=dev)
                torch.set_num_threads(args.gpu_threads)
                merge_tensor(spec, "warm-up", MemorySource(base[:64], [t[:64] for t in tasks]),
                             MemorySink((64, shape[1]), K), plan_tensor(spec, (64, shape[1]), K, GiB, device=dev),
                             device=dev)
                t_host, s_gpu, r_gpu = time_merge(spec, shape, host, dev, gplan, args.repeats)
                t_dev, _, _ = time_merge(spec, shape, on_gpu, dev, gplan, args.repeats)
                row.update(gpu_host_s=t_host, gpu_dev_s=t_dev, gpu_chunk_rows=gplan.chunk_rows,
                           gpu_ns_per_task_element=t_host * 1e9 / (K * n),
                           gpu_dev_ns_per_task_element=t_dev * 1e9 / (K * n))
                if (K <= 8 or name in CPU_AT_K32) and K <= args.cpu_max_k and \
                        (not args.cpu_methods or name in args.cpu_methods):
                    torch.set_num_threads(1)       # a merge worker's setting
                    merge_tensor(spec, "warm-up", MemorySource(base[:64], [t[:64] for t in tasks]),
                                 MemorySink((64, shape[1]), K), plan_tensor(spec, (64, shape[1]), K, GiB))
                    cplan = plan_tensor(spec, shape, K, args.cpu_budget_gib * GiB, device="cpu",
                                        source_bytes_per_element=2)
                    t_cpu, s_cpu, r_cpu = time_merge(spec, shape, host, "cpu", cplan, 1)
                    row.update(cpu_s=t_cpu, cpu_chunk_rows=cplan.chunk_rows,
                               cpu_ns_per_task_element=t_cpu * 1e9 / (K * n),
                               speedup_host=t_cpu / t_host, speedup_dev=t_cpu / t_dev,
                               kept_equal=[r["kept"] for r in r_cpu.stats] == [r["kept"] for r in r_gpu.stats],
                               **compare_sinks(s_cpu, s_gpu))
            except Exception as e:  # noqa: BLE001 (one failing case must not lose the others)
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            print("[kernel]", json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                          for k, v in row.items()}), flush=True)
            rows.append(row)
            save()
        del host, on_gpu, base, tasks
        if torch.device(dev).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def profile_case(args, dev: str) -> dict:
    """torch.profiler over one merge_tensor with the source on the device: the ops that take the
    time, by device time and by host time, and how many kernels were launched."""
    from torch.profiler import ProfilerActivity, profile
    name, K = args.profile.rsplit("@", 1)
    K = int(K)
    method, phi = METHODS[name]
    shape = (args.rows, args.cols)
    base, tasks = make_family(shape, K, dev, seed=K)
    src = MemorySource(base.to(dev), [t.to(dev) for t in tasks])
    spec = MergeSpec(method, phi(), tuple(f"task{k}" for k in range(K)))
    plan = plan_tensor(spec, shape, K, args.gpu_budget_gib * GiB, device=dev)
    time_merge(spec, shape, src, dev, plan, 1)                  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(dev).type == "cuda" else [])
    with profile(activities=acts) as prof:
        wall, _, _ = time_merge(spec, shape, src, dev, plan, 1)
    ev = prof.key_averages()
    dev_attr = "device_time_total" if hasattr(ev[0], "device_time_total") else "cuda_time_total"

    def top(key):
        rows = sorted(ev, key=lambda e: getattr(e, key), reverse=True)[:15]
        return [{"op": e.key, "calls": e.count, "ms": round(getattr(e, key) / 1e3, 2)} for e in rows]
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in ev if "Synchronize" in e.key or e.key in ("cudaMemcpyAsync", "cudaMemcpy"))
    out = {"case": args.profile, "wall_s": wall, "kernel_launches": launches, "memcpy_or_sync_calls": syncs,
           "by_device_time": top(dev_attr), "by_host_time": top("self_cpu_time_total")}
    print("[profile]", json.dumps(out)[:3000], flush=True)
    return out


# ---------------------------------------------------------------- merge part

def merge_config(method: str, man: dict, k: int, run_dir: Path, device: str) -> str:
    names = man["params"]["names"][:k]
    lines = [f"base: {Path(man['base']).resolve()}", "models:"]
    lines += [f"  - {{name: {n}, path: {Path(man['tasks'][n]).resolve()}}}" for n in names]
    lines += {"ties": ["method: ties", "sparsify: {kind: topk, density: 0.2}", "lambda: 1.0"],
              "emr_tadrop": ["method: emr", "sparsify: {kind: tadrop, a: 0.5, b: 0.95}"]}[method]
    lines += [f"output: {run_dir}", "output_dtype: bfloat16", "shard_size: 5GB", "seed: 0",
              f"device: {device}"]
    return "\n".join(lines) + "\n"


def compare_runs(a: Path, b: Path) -> dict:
    """Mask chunks byte for byte, the drop table's exact columns, the values in ulp of bf16."""
    import pyarrow.parquet as pq
    from safetensors import safe_open
    da, db = bm_tree(a), bm_tree(b)
    masks = [k for k in da if k.startswith("masks.zarr")]
    out = {"same_files": set(da) == set(db), "mask_files": len(masks),
           "mask_files_equal": sum(da[k] == db.get(k) for k in masks)}
    ta, tb = pq.read_table(a / "stats.parquet"), pq.read_table(b / "stats.parquet")
    out["stats_exact_columns_equal"] = all(ta.column(c).to_pylist() == tb.column(c).to_pylist()
                                           for c in ("tensor", "task", "numel", "q_a", "q_b", "drop_rate", "kept"))
    worst_ulp, differ, total = 0, 0, 0
    for f in (k for k in da if k.endswith(".safetensors")):
        with safe_open(str(a / f), "pt") as fa, safe_open(str(b / f), "pt") as fb:
            for name in fa.keys():
                x, y = fa.get_tensor(name), fb.get_tensor(name)
                xi, yi = x.view(torch.int16).int(), y.view(torch.int16).int()
                d = (xi - yi).abs()
                d = d[(x.float() * y.float() >= 0)]          # same sign: the ulp distance is the int gap
                worst_ulp = max(worst_ulp, int(d.max()) if d.numel() else 0)
                differ += int((xi != yi).sum())
                total += x.numel()
    out.update(values_differing=differ, values=total, worst_ulp_bf16=worst_ulp)
    return out


def bm_tree(root: Path) -> dict:
    import hashlib
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in (".tadrop", "run.json"):
            h = hashlib.blake2b(digest_size=16)
            with open(p, "rb") as fh:
                while chunk := fh.read(16 << 20):
                    h.update(chunk)
            out[str(rel)] = h.hexdigest()
    return out


def merge_part(args, dev: str, data: Path) -> dict:
    free = shutil.disk_usage(data.parent if not data.exists() else data).free
    sizes = dict(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, vocab=32000,
                 heads=args.hidden // 128, kv_heads=args.hidden // 128)
    per_model = 2 * (2 * 32000 * args.hidden + args.layers * (4 * args.hidden ** 2 + 3 * args.hidden
                                                              * args.intermediate))
    k = args.merge_k
    while k > 2 and (k + 1) * per_model + 3 * per_model * 2 > 0.85 * free:
        k //= 2                                   # the disk decides: inputs + two runs' outputs
    t0 = time.perf_counter()
    man = mdm.make_models(data / "models", **sizes, k=k, dtype="bfloat16", shards=1, seed=0,
                          threads=os.cpu_count())
    gen_s = time.perf_counter() - t0
    print(f"[merge] generated base + {k} fine-tunes of {per_model / 1e9:.2f} GB in {gen_s:.0f} s", flush=True)
    res = {"k": k, "sizes": sizes, "model_bytes": man["total_size"], "generate_s": round(gen_s, 1), "runs": [],
           "comparisons": {}}
    cores = os.cpu_count() or 1
    for method in args.merge_methods:
        dirs = {}
        for role, device, workers, budget in (("cpu", "cpu", args.cpu_workers or cores, args.cpu_budget_gib),
                                              ("gpu", dev, args.gpu_workers, args.gpu_budget_gib)):
            tag = f"{method}-{role}"
            run_dir, cfg, log = data / "runs" / tag, data / f"{tag}.yaml", args.logs / f"{tag}.log"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg.write_text(merge_config(method, man, k, run_dir, device))
            cmd = [sys.executable, "-m", "pipeline.cli", "merge", str(cfg), "--workers", str(workers),
                   "--memory-budget", f"{budget}GiB", "--quiet"]
            env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
            m = bm.run_measured(cmd, log, env=env)
            row = {"case": tag, "method": method, "role": role, "device": device, "workers": workers, "budget_gib": budget,
                   "rc": m["rc"], "wall_s": round(m["wall_s"], 2), "tree_cpu_s": round(m["tree_cpu_s"], 1),
                   "peak_rss_gib": round(m["rss"] / GiB, 2),
                   "task_elements": k * man["total_size"] // 2}
            if m["rc"] == 0:
                rec = json.loads((run_dir / "run.json").read_text())
                row["timings"] = rec.get("timings")
                row["ns_per_task_element"] = m["wall_s"] * 1e9 / row["task_elements"]
                dirs[role] = run_dir
            else:
                row["log_tail"] = log.read_text()[-2000:]
            print("[merge]", json.dumps({k_: v for k_, v in row.items() if k_ != "log_tail"}), flush=True)
            res["runs"].append(row)
        if len(dirs) == 2:
            a, b = dirs.values()
            res["comparisons"][method] = compare_runs(a, b)
            print(f"[merge] {method} cpu vs gpu: {res['comparisons'][method]}", flush=True)
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    if not args.keep_data:
        shutil.rmtree(data, ignore_errors=True)
    return res


# ---------------------------------------------------------------- tests

CUDA_TESTS = ("tests/test_cuda_merge.py", "tests/test_streamed.py::test_cuda_matches_cpu",
              "tests/test_bank.py::test_cuda_bank_equals_export", "tests/test_device_batches.py")


def run_tests(logs: Path, only: str = "") -> dict:
    tests = [t for t in CUDA_TESTS if not only or any(o in t for o in only.split(","))]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    (logs / "cuda-tests.log").write_text(p.stdout + p.stderr)
    tail = [ln for ln in p.stdout.splitlines() if ln.strip()]
    summary = tail[-1] if tail else "(no output)"
    print(f"[tests] exit {p.returncode}: {summary}", flush=True)
    return {"cmd": "pytest " + " ".join(tests), "rc": p.returncode, "summary": summary,
            "seconds": round(time.perf_counter() - t0, 1),
            "skips": [ln for ln in p.stdout.splitlines() if ln.startswith("SKIPPED")]}


# ---------------------------------------------------------------- report

def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def render(r: dict) -> str:
    g = r["gpu"]
    lines = ["# GPU benchmark (scripts/bench_gpu.py)", "",
             f"Measured {r['when']} on **{g.get('name')}** ({g.get('memory_gib', '?')} GiB, driver "
             f"{g.get('driver', '?')}, CUDA {g.get('cuda', '?')}) with **{r['cpu']}**, {r['cores']} cores, "
             f"{r['ram_gib']:.0f} GiB of RAM; torch {r['torch']}, Python {r['python']}; native kernels: "
             f"{'built' if r.get('native') else '**not built** (the CPU side runs the torch path)'}. "
             "Every ratio below "
             "compares runs of this one process on this one machine.", ""]
    if r.get("note"):
        lines += [f"**Note**: {r['note']}", ""]
    if r.get("kernel"):
        k0 = r["kernel"][0]
        lines += ["## merge_tensor, one tensor", "",
                  f"A {args_shape(r)} tensor ({k0['elements']:,} elements{mlp7b(r)}), bf16 checkpoints, "
                  "tau_k = theta_k - theta_0 included, the outputs copied back to host memory. **CPU**: one "
                  f"merge worker (one torch thread, native kernels, a {r['args']['cpu_budget_gib']} GiB budget: "
                  "row-chunked where the plan says so). **GPU, host source**: the checkpoints in host memory, "
                  "as a worker's mmaps are (the copies in counted). **GPU, resident**: the checkpoints already "
                  f"on the GPU (the maths alone). GPU times are medians of {r['args']['repeats']} after a "
                  "warm-up; ns per task-element.", "",
                  "| K | method | CPU worker | GPU, host source | GPU, resident | CPU / GPU (host source) "
                  "| masks equal | kept equal | values bit-identical | max abs diff |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
        for row in r["kernel"]:
            if "error" in row:
                lines.append(f"| {row['K']} | {row['method']} | error: {row['error']} | | | | | | | |")
                continue
            me, ke, bi, md = (row.get(x) for x in ("masks_equal", "kept_equal", "bit_identical_share",
                                                    "max_abs_diff"))
            sp = row.get("speedup_host")
            lines.append(
                f"| {row['K']} | {row['method']} | {fmt(row.get('cpu_ns_per_task_element'))} | "
                f"{fmt(row['gpu_ns_per_task_element'], 3)} | {fmt(row['gpu_dev_ns_per_task_element'], 3)} | "
                f"{'-' if sp is None else f'{sp:.1f}x'} | {yes_no(me)} | {yes_no(ke)} | "
                f"{'-' if bi is None else f'{bi:.4%}'} | {'-' if md is None else f'{md:.2e}'} |")
        a = r["args"]
        which = ", ".join(a.get("cpu_methods") or []) or "every method up to K = 8; at K = 32 " + \
            ", ".join(CPU_AT_K32)
        lines += ["", f"CPU rows: {which}, at K <= {a.get('cpu_max_k', 32)} (the CPU takes seconds per "
                  "method; the GPU rows are the point)."]
    if r.get("merge"):
        m = r["merge"]
        s = m["sizes"]
        lines += ["", "## tadrop merge, end to end", "",
                  f"Generated LLaMA-shaped checkpoints: hidden {s['hidden']}, {s['layers']} layers, MLP "
                  f"{s['intermediate']}, vocab {s['vocab']}, bf16, {m['model_bytes'] / 1e9:.2f} GB each; base + "
                  f"K = {m['k']} fine-tunes ({(m['k'] + 1) * m['model_bytes'] / 1e9:.1f} GB of inputs, in the page "
                  f"cache: generated in {m['generate_s']:.0f} s just before). Same config but for `device`.", "",
                  "| case | workers x budget | wall s | ns / task-element (wall) | CPU s (tree) | peak RSS GiB "
                  "| plan / map / reduce s |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for row in m["runs"]:
            if row["rc"] != 0:
                lines.append(f"| {row['case']} | {row['workers']} x {row['budget_gib']} GiB | failed rc "
                             f"{row['rc']} | | | | |")
                continue
            t = row.get("timings") or {}
            lines.append(f"| {row['case']} | {row['workers']} x {row['budget_gib']} GiB | {row['wall_s']:.1f} | "
                         f"{row['ns_per_task_element']:.3f} | {row['tree_cpu_s']:.0f} | {row['peak_rss_gib']:.2f} | "
                         f"{fmt(t.get('plan_s'), 1)} / {fmt(t.get('map_s'), 1)} / {fmt(t.get('reduce_s'), 1)} |")
        walls = {(row["method"], row["role"]): row["wall_s"] for row in m["runs"] if row["rc"] == 0}
        for method, c in m["comparisons"].items():
            cpu, gpu = walls.get((method, "cpu")), walls.get((method, "gpu"))
            ratio = f"GPU {cpu / gpu:.2f}x the CPU's speed; " if cpu and gpu else ""
            lines.append(f"\n{method}: {ratio}mask chunks equal {c['mask_files_equal']} of {c['mask_files']}; "
                         f"drop table's exact columns equal: {'yes' if c['stats_exact_columns_equal'] else '**no**'}; "
                         f"{c['values_differing']:,} of {c['values']:,} bf16 values differ "
                         f"(at most {c['worst_ulp_bf16']} ulp).")
    if r.get("profile"):
        p = r["profile"]
        lines += ["", f"## Profile: {p['case']}, source on the GPU", "",
                  f"{p['wall_s']:.3f} s under the profiler; {p['kernel_launches']:,} kernel launches, "
                  f"{p['memcpy_or_sync_calls']:,} copies / synchronisations. Top ops by GPU time:", "",
                  "| op | calls | GPU ms |", "| --- | ---: | ---: |"]
        lines += [f"| `{o['op'][:60]}` | {o['calls']} | {o['ms']} |" for o in p["by_device_time"][:10]]
        lines += ["", "Top ops by host time (self):", "", "| op | calls | host ms |", "| --- | ---: | ---: |"]
        lines += [f"| `{o['op'][:60]}` | {o['calls']} | {o['ms']} |" for o in p["by_host_time"][:10]]
    if r.get("tests"):
        t = r["tests"]
        lines += ["", "## CUDA tests", "", f"`{t['cmd']}`: exit {t['rc']}; {t['summary']}"]
    if r.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in r["errors"]]
    return "\n".join(lines) + "\n"


def mlp7b(r) -> str:
    return "; LLaMA-7B's MLP" if (r["args"]["rows"], r["args"]["cols"]) == (4096, 11008) else ""


def yes_no(v) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def args_shape(r):
    a = r["args"]
    return f"{a['rows']} x {a['cols']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench")
    ap.add_argument("--stem", default="gpu")
    ap.add_argument("--gpu-device", default="cuda", help="cuda, or cpu to check the script without a GPU")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--kernel-k", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-budget-gib", type=int, default=2)
    ap.add_argument("--gpu-budget-gib", type=int, default=16)
    ap.add_argument("--gpu-threads", type=int, default=4, help="torch CPU threads on the GPU side")
    ap.add_argument("--cpu-methods", type=lambda s: s.split(","), default=[],
                    help="comma-separated kernel methods that also run on the CPU (default: all)")
    ap.add_argument("--cpu-max-k", type=int, default=32, help="no CPU kernel runs above this K")
    ap.add_argument("--profile", default="", help="METHOD@K: torch.profiler over one resident GPU run")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--merge-k", type=int, default=16)
    ap.add_argument("--merge-methods", type=lambda s: s.split(","), default=["ties", "emr_tadrop"])
    ap.add_argument("--cpu-workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--gpu-workers", type=int, default=4)
    ap.add_argument("--data", type=Path, default=REPO / ".gpu_bench")
    ap.add_argument("--logs", type=Path, default=None)
    ap.add_argument("--keep-data", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: kernel,merge")
    ap.add_argument("--quick", action="store_true", help="small shapes (checks the script)")
    ap.add_argument("--tests", action="store_true", help="first run the CUDA tests (pytest) and record them")
    ap.add_argument("--tests-only", default="", help="comma-separated substrings: run only those test files")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.cols, args.kernel_k, args.repeats = 256, 1024, [2, 4], 1
        args.hidden, args.intermediate, args.layers, args.merge_k = 256, 688, 2, 3
    dev = args.gpu_device
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch "
              f"{torch.__version__}); nothing to measure (--gpu-device cpu checks the script)", file=sys.stderr)
        return 2
    args.logs = args.logs or args.data / "logs"
    args.logs.mkdir(parents=True, exist_ok=True)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    r = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": mem / GiB, "gpu": gpu_info(dev),
         "torch": torch.__version__, "python": platform.python_version(), "native": native.where(),
         "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "errors": []}
    skip = set(filter(None, args.skip.split(",")))
    out_json = args.out / f"{args.stem}.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        out_json.write_text(json.dumps(r, indent=1))
        (args.out / f"{args.stem}.md").write_text(render(r))

    if "kernel" not in skip:
        r["kernel"] = []
        try:
            kernel_part(args, dev, r["kernel"], save)
        except Exception as e:  # noqa: BLE001 (keep what the other parts measure)
            traceback.print_exc()
            r["errors"].append(f"kernel: {type(e).__name__}: {e}")
        save()
    if args.profile:
        try:
            r["profile"] = profile_case(args, dev)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r["errors"].append(f"profile: {type(e).__name__}: {e}")
        save()
    if args.tests:
        r["tests"] = run_tests(args.logs, args.tests_only)
        save()
    if "merge" not in skip:
        try:
            r["merge"] = merge_part(args, dev, args.data)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r["errors"].append(f"merge: {type(e).__name__}: {e}")
        save()
    print(render(r))
    failed = r["errors"] or (r.get("tests") or {}).get("rc", 0) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
