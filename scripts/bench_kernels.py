"""Kernel benchmark of the maths layer on one 4096 x 11008 float32 tensor, K = 8.

Measures, single-threaded (torch.set_num_threads(1)):
  - the exact k-th smallest |x|: ours (radix select) vs torch.kthvalue vs numpy.partition
    (all three on |x|, all three exact), in ns per element;
  - merge_tensor with in-memory sources and sinks (tau_k = theta_k - theta_0 included) for
    TADrop + task arithmetic, TIES + TADrop and EMR + TADrop, in ns per task-element.
Writes bench/kernels.json and bench/kernels.md.  Run it under `nice` on a quiet machine;
the load average before and after is recorded because the machine may be shared.

    nice python3 scripts/bench_kernels.py [--rows 4096 --cols 11008 --tasks 8 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tadrop import MemorySink, MemorySource, MergeSpec, TADrop, kth_smallest_abs, merge_tensor, plan_tensor  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds of this process) over `repeats` runs after a warm-up.
    CPU time is the steadier figure on a shared machine."""
    fn()                                   # warm-up: buffers, page faults, caches
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    shape, K = (args.rows, args.cols), args.tasks
    n = args.rows * args.cols
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g) * 0.02
    tasks = [base + torch.randn(shape, generator=g) * 1e-3 for _ in range(K)]
    x = tasks[0] - base
    k = n // 3 + 1
    results: dict = {"shape": list(shape), "tasks": K, "numel": n, "repeats": args.repeats}

    # -- exact k-th smallest |x| ------------------------------------------------------------
    want = float(np.partition(np.abs(x.numpy()).reshape(-1), k - 1)[k - 1])
    assert kth_smallest_abs(x, k) == want == float(torch.kthvalue(x.abs().reshape(-1), k).values)
    xa, xn = x.abs().reshape(-1), x.numpy().reshape(-1)
    kth = {
        "ours (radix select on |x|)": best_of(lambda: kth_smallest_abs(x, k), args.repeats),
        "torch.kthvalue(|x|)": best_of(lambda: torch.kthvalue(xa, k), args.repeats),
        "numpy.partition(|x|)": best_of(lambda: np.partition(np.abs(xn), k - 1)[k - 1], args.repeats),
    }
    results["kth_ns_per_element"] = {name: w / n * 1e9 for name, (w, c) in kth.items()}
    results["kth_cpu_ns_per_element"] = {name: c / n * 1e9 for name, (w, c) in kth.items()}

    # -- merge_tensor on one tensor ----------------------------------------------------------
    names = tuple(f"task{i}" for i in range(K))
    cases = {
        "TADrop + task arithmetic": MergeSpec("task_arithmetic", TADrop(), names),
        "TIES + TADrop": MergeSpec("ties", TADrop(), names),
        "EMR + TADrop": MergeSpec("emr", TADrop(), names),
    }
    src = MemorySource(base, tasks)
    merge = {}
    for label, spec in cases.items():
        plan = plan_tensor(spec, shape, K, 1 << 40)          # everything fits: one read
        sink = MemorySink(shape, K)
        w, c = best_of(lambda: merge_tensor(spec, "bench.weight", src, sink, plan), args.repeats)
        merge[label] = {"ns_per_task_element": w / (n * K) * 1e9, "cpu_ns_per_task_element": c / (n * K) * 1e9,
                        "seconds": w, "chunk_rows": plan.chunk_rows, "fit_whole": plan.fit_whole}
    results["merge_tensor"] = merge
    results["targets"] = {"kth_ns_per_element": 4.0, "emr_tadrop_ns_per_task_element": 15.0}
    results["environment"] = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "kernels.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    env = r["environment"]
    lines = [
        "# Kernel benchmark (scripts/bench_kernels.py)",
        "",
        f"One {r['shape'][0]} x {r['shape'][1]} float32 tensor ({r['numel']:,} elements), "
        f"K = {r['tasks']} tasks, torch {env['torch']}, numpy {env['numpy']}, "
        f"{env['torch_threads']} torch thread, best of {r['repeats']} after a warm-up.",
        f"Machine: {env['cpu_count']} cores ({env['processor']}), shared with other work: load average "
        f"{env['loadavg_before'][0]:.2f} before, {env['loadavg_after'][0]:.2f} after "
        "(a load above 1 on these cores inflates the wall figures; CPU time is this process's own).",
        "",
        "## Exact k-th smallest |x| (k = n/3)",
        "",
        "| method | ns / element (wall) | ns / element (CPU) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {k} | {v:.2f} | {r['kth_cpu_ns_per_element'][k]:.2f} |" for k, v in r["kth_ns_per_element"].items()]
    lines += [f"", f"Target: <= {r['targets']['kth_ns_per_element']} ns / element.", "",
              "## merge_tensor, one tensor, in-memory source and sink", "",
              "tau_k = theta_k - theta_0, TADrop fit + apply, the merge, sink writes; read once.", "",
              "| case | ns / task-element (wall) | ns / task-element (CPU) | seconds (wall) |",
              "| --- | ---: | ---: | ---: |"]
    lines += [f"| {k} | {v['ns_per_task_element']:.2f} | {v['cpu_ns_per_task_element']:.2f} | {v['seconds']:.2f} |"
              for k, v in r["merge_tensor"].items()]
    lines += ["", f"Target: EMR + TADrop <= {r['targets']['emr_tadrop_ns_per_task_element']} ns / task-element.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
