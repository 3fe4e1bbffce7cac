"""Kernel benchmark of the maths layer: each selection step against its exact alternatives, and
merge_tensor per task-element, measured interleaved in one run (ratios hold on a shared machine).

Selection steps (all exact, all on |x| of float32 task vectors; ns per element of CPU time):
  - top-k threshold of one whole tensor (one rank): radix select vs numpy.partition vs torch.kthvalue;
  - TADrop's statistics of one whole tensor (Q0.5, Q0.95, the (k+1)-th smallest, kept count):
    radix select (histograms) vs numpy.partition (tadrop/select.py AbsOrder);
  - the same read in 8 row chunks (only mergeable histograms can do it without a whole copy)
    and at model scope (one threshold over 4 tensors: per-tensor histograms merged), against
    numpy.partition on a gathered copy as the reference.
The engine's path for a whole tensor is chosen per process by measurement (tadrop.select); the
report says which path each case took and its ratio to the fastest exact alternative.
merge_tensor (in-memory source and sink, tau_k = theta_k - theta_0 included, read once) runs
with the engine's choice ('auto') and with the radix path forced, so the gain is measured too.

    nice python3 scripts/bench_kernels.py [--rows 2048 --cols 11008 --tasks 8 --repeats 5]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tadrop import (AbsSelector, MemorySink, MemorySource, MergeSpec, TADrop, TopK,  # noqa: E402
                    merge_tensor, plan_tensor)
from tadrop import _bools as B  # noqa: E402
from tadrop import native, select  # noqa: E402
from tadrop.sparsify import ChunkKey  # noqa: E402

TARGET_RATIO = 1.2


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_cpu_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: (median CPU s, median wall s)}: one warm-up each, then `repeats` rounds of every fn in turn."""
    for f in fns.values():
        f()
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


# ---- the selection steps, each method computing the same exact answer ----------------------

def radix_one(x, r):
    s = AbsSelector()
    s.add_hi(x)
    s.select([r])
    s.add_lo(x)
    return s.value(r), s.count_below(r)


def partition_one(x, r):
    o = select.AbsOrder(x)
    return o.value(r), o.count_below(r)


def native_one(x, r):
    o = select.NativeOrder(x)
    return o.value(r), o.count_below(r)


def no_probe(fn):
    """fn with AbsOrder's heavy-tie probe off: numpy's partition as it is."""
    def run():
        old, select._PROBE_MIN = select._PROBE_MIN, 1 << 62
        try:
            return fn()
        finally:
            select._PROBE_MIN = old
    return run


def tied_task_vector(shape, seed: int = 1, zeros: float = 0.4) -> torch.Tensor:
    """What a bf16 fine-tune's task vector looks like: differences of bf16 numbers (few distinct
    values, long runs of equal ones) with a fraction exactly zero (weights the fine-tune left as
    they were, e.g. embedding rows of unseen tokens; 41% in the benchmark's generated embedding)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    tuned = (base.float() + torch.randn(shape, generator=g) * 1e-3).bfloat16()
    tau = (tuned.float() - base.float()).reshape(-1)
    tau[torch.rand(tau.numel(), generator=g) < zeros] = 0.0
    return tau


def tadrop_stats(x, method: str, chunks: int = 1):
    """TADrop's fit statistics through the sparsifier itself, forced to one method
    (chunks > 1: streamed over row chunks, where only radix applies)."""
    os.environ[select.ENV] = method
    phi = TADrop()
    if chunks > 1:
        parts = x.view(chunks, -1)
        st = phi.fit_streamed(lambda: iter(parts), x.numel())
    else:
        st = phi.fit(x)
    return st.q_a, st.q_b, st.threshold, st.kept


def model_scope_radix(xs, r):
    sels = []
    for x in xs:
        s = AbsSelector()
        s.add_hi(x)
        sels.append(s)
    m = AbsSelector()
    for s in sels:
        m.merge(s)
    parts = [m.lo_part([r]) for _ in xs]
    for p, x in zip(parts, xs):
        p.add_lo(x)
    for p in parts:
        m.merge_lo(p)
    return m.value(r), m.count_below(r)


def model_scope_partition(xs, r):
    return partition_one(torch.cat(xs), r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before, busy0, t_start = os.getloadavg(), busy_cpu_s(), time.perf_counter()
    c_start = time.process_time()
    shape, K = (args.rows, args.cols), args.tasks
    n = args.rows * args.cols
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g) * 0.02
    tasks = [base + torch.randn(shape, generator=g) * 1e-3 * (1 + k % 3) for k in range(K)]
    x = (tasks[0] - base).reshape(-1)
    results: dict = {"shape": list(shape), "tasks": K, "numel": n, "repeats": args.repeats}

    # which path the engine takes on this machine (its own measurement, made once per process)
    os.environ[select.ENV] = "auto"
    chosen = {kind: select.whole_method(kind) for kind in ("one", "tadrop")}
    results["engine_choice"] = {"chosen": chosen, "calibration": select.calibration()}

    steps = []
    has_native = "native" in select.available_methods()
    results["native_kernels"] = native.where()
    xt = tied_task_vector(shape)
    r = n - n // 5
    for data, label in ((x, "Gaussian"), (xt, "bf16 task vector, 40% zeros")):
        # 1. one rank (top-k threshold, density 0.2), whole tensor
        want = partition_one(data, r)
        assert radix_one(data, r) == want == no_probe(lambda: partition_one(data, r))()
        assert float(torch.kthvalue(data.abs(), r + 1).values) == want[0]
        fns = {"radix": lambda: radix_one(data, r), "partition": lambda: partition_one(data, r),
               "partition, no probe": no_probe(lambda: partition_one(data, r)),
               "torch.kthvalue": lambda: torch.kthvalue(data.abs(), r + 1)}
        if has_native:
            assert native_one(data, r) == want
            fns["native"] = lambda: native_one(data, r)
        t = interleaved(fns, args.repeats)
        steps.append((f"top-k threshold (one rank), whole tensor, {label}", n, t, chosen["one"]))
        # 2. TADrop statistics, whole tensor
        want = tadrop_stats(data, "partition")
        assert tadrop_stats(data, "radix") == want == no_probe(lambda: tadrop_stats(data, "partition"))()
        fns = {"radix": lambda: tadrop_stats(data, "radix"),
               "partition": lambda: tadrop_stats(data, "partition"),
               "partition, no probe": no_probe(lambda: tadrop_stats(data, "partition"))}
        if has_native:
            assert tadrop_stats(data, "native") == want
            fns["native"] = lambda: tadrop_stats(data, "native")
        t = interleaved(fns, args.repeats)
        steps.append((f"TADrop Q0.5, Q0.95, threshold, kept; whole tensor, {label}", n, t, chosen["tadrop"]))
    # 3. the same in 8 row chunks: histograms merge, a partition would need the whole copy
    assert tadrop_stats(x, "radix", 8) == tadrop_stats(x, "partition")
    t = interleaved({"radix": lambda: tadrop_stats(x, "radix", 8),
                     "partition": lambda: tadrop_stats(x, "partition")}, args.repeats)
    steps.append(("TADrop statistics, 8 row chunks (partition: on a whole copy)", n, t, "radix"))
    # 4. model scope: one threshold over 4 tensors
    xs = [(tk - base).reshape(-1) for tk in tasks[:4]]
    N, rm = 4 * n, 4 * n - (4 * n) // 5
    assert model_scope_radix(xs, rm) == model_scope_partition(xs, rm)
    t = interleaved({"radix": lambda: model_scope_radix(xs, rm),
                     "partition": lambda: model_scope_partition(xs, rm)}, args.repeats)
    steps.append(("model scope: one rank over 4 tensors (partition: on a gathered copy)", N, t, "radix"))
    results["selection"] = [
        {"step": name, "elements": ne, "taken": taken,
         "cpu_ns_per_element": {m: c / ne * 1e9 for m, (c, w) in tt.items()},
         "wall_ns_per_element": {m: w / ne * 1e9 for m, (c, w) in tt.items()}}
        for name, ne, tt, taken in steps]
    for s in results["selection"]:
        c = s["cpu_ns_per_element"]
        s["fastest"] = min(c, key=c.get)
        s["ratio_to_fastest"] = c[s["taken"]] / c[s["fastest"]]
        # row-chunked / model scope: radix is the only path within the memory budget
        s["meets_target"] = s["ratio_to_fastest"] <= TARGET_RATIO if "whole tensor" in s["step"] else None
    os.environ.pop(select.ENV, None)

    # -- bool steps: the engine's masks (tadrop/_bools.py) against torch's own CPU kernels -----------
    blk = torch.stack([(tk - base).reshape(-1)[: 1 << 17] for tk in tasks[:4]])   # [4, 2^17], one cache block
    m = blk.numel()
    bmask = torch.empty(blk.shape, dtype=torch.bool)
    fbuf = torch.empty(blk.shape)
    assert torch.equal(B.compare(blk, "gt", 0, bmask), torch.gt(blk, 0))
    assert B.mask_counts(bmask)[0] == [int(torch.count_nonzero(bmask[k])) for k in range(4)]
    bool_steps = [
        ("comparison into a bool mask (tau > 0)", {"torch": lambda: torch.gt(blk, 0, out=bmask),
                                                   "engine": lambda: B.compare(blk, "gt", 0, bmask)}),
        ("bool mask -> float32 0/1", {"torch": lambda: fbuf.copy_(bmask),
                                      "engine": lambda: B.as_float(bmask, fbuf)}),
        ("true entries per row (the engine's pass also counts the keep histogram)",
         {"torch": lambda: [torch.count_nonzero(bmask[k]) for k in range(4)],
          "engine": lambda: B.mask_counts(bmask)}),
    ]
    results["bool_steps"] = []
    for label, fns in bool_steps:
        t = interleaved(fns, max(args.repeats, 20))
        c = {k: v[0] / m * 1e9 for k, v in t.items()}
        results["bool_steps"].append({"step": label, "elements": m, "cpu_ns_per_element": c,
                                      "speedup": c["torch"] / c["engine"]})

    # -- merge_tensor on one tensor, engine's choice vs radix forced --------------------------
    names = tuple(f"task{i}" for i in range(K))
    cases = {
        "TIES (top-k 0.2)": MergeSpec("ties", TopK(0.2), names),
        "TIES + TADrop": MergeSpec("ties", TADrop(), names),
        "EMR + TADrop": MergeSpec("emr", TADrop(), names),
    }
    # bf16 checkpoints (what users merge): tau_k has ties and exact zeros
    g16 = torch.Generator().manual_seed(2)
    base16 = base.bfloat16()
    tasks16 = []
    for k in range(K):
        t = (base16.float() + torch.randn(shape, generator=g16) * 1e-3 * (1 + k % 3)).bfloat16()
        keep = torch.rand(shape, generator=g16) < 0.4       # rows of weights the fine-tune left alone
        tasks16.append(torch.where(keep, base16, t))
    cases["EMR + TADrop, bf16 checkpoints"] = MergeSpec("emr", TADrop(), names)
    cases["TIES (top-k 0.2), bf16 checkpoints"] = MergeSpec("ties", TopK(0.2), names)
    fns, meta = {}, {}
    for label, spec in cases.items():
        src = MemorySource(base16, tasks16) if "bf16" in label else MemorySource(base, tasks)
        plan = plan_tensor(spec, shape, K, 1 << 40)          # everything fits: one read
        sink = MemorySink(shape, K)
        for mode in ("auto", "radix"):
            def run(spec=spec, plan=plan, sink=sink, mode=mode, src=src):
                os.environ[select.ENV] = mode
                merge_tensor(spec, "bench.weight", src, sink, plan)
            fns[(label, mode)] = run
            meta[(label, mode)] = plan
    t = interleaved(fns, args.repeats)
    os.environ.pop(select.ENV, None)
    results["merge_tensor"] = [
        {"case": label, "selection": mode if mode == "radix" else f"auto ({chosen['tadrop' if 'TADrop' in label else 'one']})",
         "cpu_ns_per_task_element": c / (n * K) * 1e9, "wall_ns_per_task_element": w / (n * K) * 1e9,
         "chunk_rows": meta[(label, mode)].chunk_rows}
        for (label, mode), (c, w) in t.items()]
    results["targets"] = {"ratio_to_fastest_exact": TARGET_RATIO}
    wall, own = time.perf_counter() - t_start, time.process_time() - c_start
    results["environment"] = {
        "cpu_model": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "others_cpu_share": max(0.0, busy_cpu_s() - busy0 - own) / (wall * (os.cpu_count() or 1)),
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
        f"CPU: **{env['cpu_model']}**, {env['cpu_count']} cores, shared with other work: load average "
        f"{env['loadavg_before'][0]:.2f} before, {env['loadavg_after'][0]:.2f} after; other processes used "
        f"{env['others_cpu_share']:.0%} of the cores during the run. torch {env['torch']}, numpy {env['numpy']}, "
        f"{env['torch_threads']} torch thread. {r['shape'][0]} x {r['shape'][1]} float32 tensors "
        f"({r['numel']:,} elements), K = {r['tasks']}. Every figure is the median CPU time of "
        f"{r['repeats']} interleaved rounds (the compared cases alternate, so load hits them alike); "
        "ratios within this run are the result, absolute figures move with the machine and its load.",
        "",
        "## Selection: each step against its exact alternatives (ns / element, CPU)",
        "",
        "All methods return the same exact values and counts (asserted before timing). `taken` is the "
        "path the engine uses; for a whole tensor it is chosen per process by measurement "
        f"(tadrop/select.py; here: top-k {r['engine_choice']['chosen']['one']}, "
        f"TADrop {r['engine_choice']['chosen']['tadrop']}).",
        "",
        "| step | radix select | numpy.partition | numpy.partition, no probe | torch.kthvalue | native counting | taken | taken / fastest |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in r["selection"]:
        c = s["cpu_ns_per_element"]
        cell = lambda m: (f"**{c[m]:.2f}**" if m == s["fastest"] else f"{c[m]:.2f}") if m in c else "-"  # noqa: E731
        lines.append(f"| {s['step']} | {cell('radix')} | {cell('partition')} | {cell('partition, no probe')} | "
                     f"{cell('torch.kthvalue')} | {cell('native')} | {s['taken']} | {s['ratio_to_fastest']:.2f} |")
    lines += ["", "`numpy.partition` is the engine's partition path (tadrop/select.py AbsOrder: blockwise |x|, "
              "and a sampled probe that settles a rank lying inside a long run of equal values by two "
              "counting passes); `no probe` is the same with the probe off: numpy's introselect alone, which "
              "slows down many-fold when the rank falls inside such a run (bf16 task vectors have them). "
              "`native counting` is tadrop/select.py NativeOrder: two C passes counting |x|'s float32 bit "
              "patterns (top 16 bits, then the low 16 bits of the buckets asked), no copy, indifferent to "
              f"runs of equal values (library: {r.get('native_kernels') or 'not built, column empty'}).",
              "", f"Target: the path taken within {r['targets']['ratio_to_fastest_exact']}x of the fastest exact "
              "alternative. Row-chunked and model-scope selection must merge histograms (a partition needs "
              "the whole data in one array, which the memory budget forbids there); their partition column "
              "is the cost of that forbidden copy-and-partition, for reference.",
              "", "Calibration of this process (2^21-element sample, best of 3, CPU ns / element): "
              + "; ".join(f"{k}: " + ", ".join(f"{m} {v:.2f}" for m, v in c["ns_per_element"].items())
                          for k, c in r["engine_choice"]["calibration"].items()) + ".",
              "", "## Bool steps of the masks (ns / element, CPU)", "",
              "A [4, 2^17] float32 block of task vectors (one engine cache block). `engine` is tadrop/_bools.py "
              "(numpy's SIMD loops on the same memory, or the mask's bytes as uint8); `torch` is torch's own "
              "CPU kernel for the same step. Same results (asserted).", "",
              "| step | torch | engine | torch / engine |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {b['step']} | {b['cpu_ns_per_element']['torch']:.3f} | {b['cpu_ns_per_element']['engine']:.3f} | "
              f"{b['speedup']:.1f}x |" for b in r.get("bool_steps", [])]
    lines += ["", "## merge_tensor, one tensor, in-memory source and sink", "",
              "tau_k = theta_k - theta_0, the sparsifier's fit + apply, the merge, sink writes; read once.", "",
              "| case | selection | ns / task-element (CPU) | ns / task-element (wall) |",
              "| --- | --- | ---: | ---: |"]
    lines += [f"| {m['case']} | {m['selection']} | {m['cpu_ns_per_task_element']:.2f} | "
              f"{m['wall_ns_per_task_element']:.2f} |" for m in r["merge_tensor"]]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
