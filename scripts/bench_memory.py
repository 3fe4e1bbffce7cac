"""What a worker really holds per element, against what the plan estimates (pipeline.plan, tadrop.streamed
`_bytes_per_element`): the estimate sets the row chunking, so an estimate far above the truth chunks
tensors that would fit whole (a second read and decode of the K + 1 inputs), one below it breaks the
memory budget.

For each method and K, one bf16 tensor (rows x cols) and a 64-element one are merged by the real CLI
(`tadrop merge`, one local worker) under a budget large enough to take the tensor whole, and again
under one that row-chunks it; the worker's peak anonymous memory is sampled from /proc every 10 ms
(as tests/test_memory.py does). The same merge of an 8 x 8 tensor gives the worker's runtime, which is
subtracted: what is left is the engine and the sink, per element of the tensor.

    python3 scripts/bench_memory.py --ks 4,16,32 --out /tmp/mem      # ~4 min, ~2.3 GB of inputs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 2**20

CASES = {   # name -> config keys beyond base/models/output
    "task_arithmetic": {"method": "task_arithmetic", "sparsify": {"kind": "none"}},
    "ties": {"method": "ties", "sparsify": {"kind": "topk", "density": 0.2}},
    "ties+tadrop": {"method": "ties", "sparsify": {"kind": "tadrop"}},
    "task_arithmetic+dare": {"method": "task_arithmetic", "sparsify": {"kind": "dare", "p": 0.9}},
    "emr+tadrop": {"method": "emr", "sparsify": {"kind": "tadrop"}},
    "emr+tadrop mask": {"method": "emr", "sparsify": {"kind": "tadrop"}, "emr": {"tadrop": "mask"}},
    "tall_masks+tadrop": {"method": "tall_masks", "sparsify": {"kind": "tadrop"}},
    "tall_masks ties": {"method": "tall_masks", "sparsify": {"kind": "tadrop"}, "tall": {"inner": "ties"}},
    "consensus+tadrop": {"method": "consensus", "sparsify": {"kind": "tadrop"}},
}


def anon_bytes(pid: int) -> int | None:
    """Anonymous RSS: statm resident minus shared (file-backed + shmem) pages, as bench_merge.py."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def spawned_workers(root: int) -> list[int]:
    """The live multiprocessing-spawned descendants of root (the local executor's workers)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    parent[int(d)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    keep = []
    for p in out:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    keep.append(p)
        except OSError:
            pass
    return keep


def make_family(root: Path, k: int, shape: tuple[int, int]) -> dict:
    g = torch.Generator().manual_seed(k)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    small = torch.ones(64, dtype=torch.bfloat16)
    fam = {}
    for i in range(k + 1):
        name = "base" if i == 0 else f"t{i}"
        w = base if i == 0 else (base.float() + 0.002 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        (root / name).mkdir(parents=True, exist_ok=True)
        save_file({"layers.0.w.weight": w, "norm.weight": small}, str(root / name / "model.safetensors"))
        fam[name] = root / name
    return fam


def worker_peaks(proc: subprocess.Popen, timeout: float = 900) -> tuple[dict[int, int], int, str]:
    """Waits for `proc` (stderr piped), sampling its spawned workers' anonymous memory every 10 ms:
    (peak per worker pid, samples taken, stderr)."""
    peaks: dict[int, int] = {}
    n = [0]

    def sample():
        ws: list[int] = []
        while proc.poll() is None:
            if n[0] % 10 == 0:                 # the process tree is dearer to read than statm
                ws = spawned_workers(proc.pid)
            for p in ws:
                a = anon_bytes(p)
                if a is not None:
                    peaks[p] = max(peaks.get(p, 0), a)
            n[0] += 1
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    _, err = proc.communicate(timeout=timeout)
    t.join()
    return peaks, n[0], err


def run(fam: dict, case: dict, budget: int, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = {"base": str(fam["base"]), "models": [{"name": n, "path": str(p)} for n, p in fam.items() if n != "base"],
           "output": str(run_dir), "workers": 1, "memory_budget": budget, "output_dtype": "bfloat16", **case}
    path = run_dir.parent / (run_dir.name + ".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TADROP_EVICT_INPUTS": "0",
           "TADROP_INLINE_BYTES": "0"}   # a spawned worker, as in a real run
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "merge", str(path), "--quiet"], cwd=REPO,
                            env=env, stderr=subprocess.PIPE, text=True)
    peaks, _, err = worker_peaks(proc)
    if proc.returncode != 0:
        raise SystemExit(f"merge failed ({case}): {err[-2000:]}")
    summary = json.loads((run_dir / ".tadrop" / "plan.json").read_text())["summary"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"peak_anon": max(peaks.values(), default=0), "est": summary["max_est_bytes_per_worker"],
            "chunked": summary["chunked_tensors"] > 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="4,16,32")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--chunked-budget", default="512MiB", help="budget that row-chunks the tensor")
    ap.add_argument("--out", type=Path, required=True, help="scratch directory (inputs, runs)")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "memory")
    a = ap.parse_args(argv)
    shape = (a.rows, a.cols)
    numel = a.rows * a.cols
    rows = []
    for k in [int(x) for x in a.ks.split(",")]:
        fam = make_family(a.out / f"k{k}", k, shape)
        tiny = make_family(a.out / f"k{k}-tiny", k, (8, 8))
        for name in a.cases.split(","):
            case = CASES[name]
            runtime = run(tiny, case, "16GiB", a.out / "run")["peak_anon"]
            for label, budget in (("whole", "16GiB"), ("chunked", a.chunked_budget)):
                r = run(fam, case, budget, a.out / "run")
                r.update(case=name, K=k, budget=budget, plan=label, runtime=runtime,
                         measured=max(0, r["peak_anon"] - runtime))
                r["measured_per_element"] = r["measured"] / numel
                r["ratio"] = r["measured"] / r["est"] if r["est"] else None
                rows.append(r)
                print(f"K={k:>2} {name:<22} {label:<7} chunked={r['chunked']!s:<5} runtime "
                      f"{runtime / MiB:6.0f} MiB  measured {r['measured'] / MiB:7.1f} MiB "
                      f"({r['measured_per_element']:6.1f} B/el)  estimate {r['est'] / MiB:7.1f} MiB  "
                      f"measured/estimate {r['ratio']:.2f}", flush=True)
        shutil.rmtree(a.out / f"k{k}", ignore_errors=True)
        shutil.rmtree(a.out / f"k{k}-tiny", ignore_errors=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu,
            "python": platform.python_version(), "shape": list(shape), "rows": rows}
    a.results.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    lines = ["# Worker memory per element: measured against the plan's estimate", "",
             f"{meta['date']} on **{cpu}**; one bf16 tensor of {a.rows} x {a.cols} (plus a 64-element one), "
             "output bfloat16, one spawned local worker (`TADROP_INLINE_BYTES=0`), `TADROP_EVICT_INPUTS=0`. measured = the worker's peak "
             "anonymous memory minus the same merge's on an 8 x 8 tensor (the runtime); estimate = the "
             "plan's `est_bytes` for the tensor (what the row chunking is sized by). "
             f"Whole: budget 16 GiB; chunked: budget {a.chunked_budget}.", "",
             "| case | K | plan | row-chunked | runtime MiB | measured MiB | B / element | estimate MiB | measured / estimate |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['K']} | {r['plan']} | {'yes' if r['chunked'] else 'no'} | "
                     f"{r['runtime'] / MiB:.0f} | {r['measured'] / MiB:.1f} | {r['measured_per_element']:.1f} | "
                     f"{r['est'] / MiB:.1f} | {r['ratio']:.2f} |")
    lines += ["", f"Command: `python3 scripts/bench_memory.py {' '.join(argv or sys.argv[1:])}`", ""]
    a.results.with_suffix(".md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
