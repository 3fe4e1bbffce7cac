#!/usr/bin/env python3
"""Pipeline benchmark: wall time and peak memory of `tadrop merge` (and mergekit) on
LLaMA-shaped checkpoints of ~1.08 GB each (hidden 2048, 8 layers, bf16).

Each case runs as a subprocess; its whole process tree (found through /proc by
session id and parent links, so worker processes and Ray's daemons count) is
sampled every 50 ms for RSS, anonymous RSS and PSS. RSS counts every mmap'd
page of the inputs that a process touched, so for an mmap reader it mostly
measures page cache, shared between processes and reclaimable; PSS splits
shared pages between their users; anonymous RSS is the private memory the
memory budget is about. The target (workers x 2 GiB + 0.5 GiB) is stated for
RSS and is judged on RSS; the other two are reported beside it.

    python3 scripts/bench_merge.py                 # the three target cases
    python3 scripts/bench_merge.py --mergekit      # + mergekit 0.1.5 on the same inputs
    python3 scripts/bench_merge.py --ray           # + the same cases with --executor ray
    python3 scripts/bench_merge.py --mergekit --cases tadrop-ties-k4,tadrop-emr_tadrop-k4,mergekit-ties-k4 \
        --repeats 2                                # the one-run mergekit comparison, interleaved
    python3 scripts/bench_merge.py --k32 --resume-test --cases tadrop-emr_tadrop-k16,tadrop-emr_tadrop-k32

Bytes read from disk: /proc/self/io read_bytes of this process before and after a case;
the kernel adds a reaped child's (and its reaped children's) I/O to its parent, so the
delta is the whole local process tree's reads (a cold cache makes them disk reads).
mergekit is run from --mergekit-venv (default /work/venvs/mergekit when it exists,
else bench_data/mergekit-venv, created with mergekit 0.1.5 over the system torch).

Generated checkpoints are cached under --data (default bench_data/, git-ignored);
results go to bench/merge.json and bench/merge.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_demo_models as mdm  # noqa: E402

GiB = 2**30
SIZES = dict(hidden=2048, layers=8, intermediate=5632, vocab=32000, heads=16, kv_heads=16)
MERGEKIT = "mergekit==0.1.5"
TARGET_WALL = {"tadrop-ties-k4": 17.0, "tadrop-emr_tadrop-k4": 20.0, "tadrop-emr_tadrop-k16": 70.0}
TARGET_VS_MERGEKIT = 10.0      # tadrop TIES K=4 at least this many times faster than mergekit's
TARGET_EMR_VS_TIES = 1.3       # EMR + TADrop K=4 wall within this factor of our TIES K=4
TARGET_READ_RATIO = 1.05       # bytes read from disk per input byte, tensor scope, cold cache
TARGET_K32_VS_K16 = 2.2        # wall linear in K


@dataclass
class Case:
    tool: str       # tadrop | mergekit
    method: str     # ties | emr_tadrop | task_arithmetic
    k: int
    executor: str = "local"

    @property
    def name(self) -> str:
        return f"{self.tool}-{self.method}-k{self.k}" + ("-ray" if self.executor == "ray" else "")


@dataclass
class Result:
    case: str
    tool: str
    method: str
    k: int
    executor: str
    rc: int
    wall_s: float
    peak_rss_gib: float
    peak_anon_gib: float
    peak_pss_gib: float
    peak_procs: int
    samples: int
    pss_samples: int
    cache: str
    busy_before: float      # machine's busy CPU share just before the case (others' jobs)
    others_cpu_share: float  # share of all cores used by other processes during the case
    tree_cpu_s: float       # CPU seconds of the measured process tree
    sampler_cpu_s: float
    tree_sys_s: float | None = None   # of which in the kernel (page-cache fills of reads and writes)
    timeline: dict | None = None      # tadrop: job id -> seconds into the run when the ledger held it
    target_wall_s: float | None = None
    target_rss_gib: float | None = None
    meets_wall: bool | None = None
    meets_rss: bool | None = None
    output_gb: float | None = None
    input_bytes: int = 0            # bytes of the K + 1 input checkpoints
    read_bytes: int | None = None   # bytes the process tree read from disk (/proc/self/io delta)
    read_ratio: float | None = None
    round: int = 0                  # repeat round (--repeats)
    resume: dict | None = None      # --resume-test: the kill / resume measurement
    timings: dict | None = None     # tadrop's run.json timings
    chunked_share: float | None = None  # inputs of row-chunked tensors / all inputs (tadrop's plan)
    digest: str | None = None       # hash of the run's output files (resume == uninterrupted)
    log: str = ""
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- /proc sampling

def _proc_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, session id) of every process."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(b")") + 2:].split()  # state ppid pgrp session ...
        out.append((int(d), int(rest[1]), int(rest[3])))
    return out


def _tree(root: int) -> list[int]:
    """root, its descendants, and anything else in root's session (start_new_session)."""
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for pid, ppid, _ in table:
        kids.setdefault(ppid, []).append(pid)
    found = {pid for pid, _, sid in table if sid == root}
    stack, seen = [root, *found], set()
    while stack:
        p = stack.pop()
        if p not in seen:
            seen.add(p)
            stack.extend(kids.get(p, []))
    return sorted(seen)


def _self_read_bytes() -> int:
    """read_bytes of this process, including its reaped children (kernel I/O accounting)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def _busy_cpu_s() -> float:
    """CPU seconds spent busy (not idle, not iowait) by the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK


def wait_idle(max_wait: float, busy_max=0.25, window=3.0) -> float:
    """Wait (up to max_wait s) for the shared machine to be mostly idle; the busy share seen."""
    t_end = time.monotonic() + max_wait
    while True:
        b0 = _busy_cpu_s()
        time.sleep(window)
        busy = (_busy_cpu_s() - b0) / (window * (os.cpu_count() or 1))
        if busy <= busy_max or time.monotonic() >= t_end:
            return round(busy, 3)


def _rss(pid: int) -> tuple[int, int] | None:
    """(RSS, anonymous RSS) in bytes from /proc/PID/statm: a few counters, cheap to read."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
        rss, shared = int(fields[1]) * PAGE, int(fields[2]) * PAGE  # shared = file + shmem pages
        return rss, rss - shared
    except (OSError, ValueError, IndexError):
        return None


def _cpu_s(pid: int) -> tuple[float, float] | None:
    """(user + system, system) CPU seconds the process itself has used so far."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / TICK, int(rest[12]) / TICK
    except (OSError, ValueError, IndexError):
        return None


def _pss(pid: int) -> int | None:
    """PSS in bytes from /proc/PID/smaps_rollup. The kernel walks the page tables for it:
    ~60 ms for 4 GB of touched mmap pages, so it is sampled far less often than RSS."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _ledger_jobs(state: Path) -> list[str]:
    """Job ids recorded in a run's ledger so far (a torn last line is not a record)."""
    try:
        lines = (state / "ledger.jsonl").read_bytes().split(b"\n")
    except OSError:
        return []
    out = []
    for x in lines[:-1]:
        try:
            out.append(json.loads(x)["job"])
        except (ValueError, KeyError):
            pass
    return out


def run_measured(cmd: list[str], log: Path, env=None, interval=0.05, pss_interval=2.0,
                 ledger: Path | None = None) -> dict:
    """Run cmd in its own session, sampling its process tree: wall time and peak sums.

    RSS, anonymous RSS and CPU time every `interval` s, the tree every 4th sample,
    PSS every `pss_interval` s; the sampler's own CPU time is returned so its cost is
    visible, and the CPU the rest of the machine used meanwhile, to show contention.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = {"rss": 0, "anon": 0, "pss": 0, "procs": 0}
    samples = pss_samples = 0
    cpu0 = time.process_time()
    busy0 = _busy_cpu_s()
    io0 = _self_read_bytes()
    cpu: dict[int, tuple[float, float]] = {}  # last (CPU, system CPU) seconds per process of the tree
    timeline: dict[str, float] = {}   # `ledger`: job id -> seconds after the start when first seen
    with open(log, "w") as lf:
        lf.write("$ " + shlex.join(cmd) + "\n")
        lf.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                             start_new_session=True)
        pids, next_pss = [p.pid], t0
        while p.poll() is None:
            if samples % 4 == 0:
                pids = _tree(p.pid)
            mems = [m for m in map(_rss, pids) if m]
            for pid in pids:
                c = _cpu_s(pid)
                if c is not None:
                    cpu[pid] = c
            peak["rss"] = max(peak["rss"], sum(m[0] for m in mems))
            peak["anon"] = max(peak["anon"], sum(m[1] for m in mems))
            peak["procs"] = max(peak["procs"], len(mems))
            now = time.perf_counter()
            if now >= next_pss:
                peak["pss"] = max(peak["pss"], sum(filter(None, map(_pss, pids))))
                pss_samples += 1
                next_pss = time.perf_counter() + pss_interval
            if ledger is not None and samples % 4 == 0:
                for j in _ledger_jobs(ledger):
                    timeline.setdefault(j, round(now - t0, 2))
            samples += 1
            time.sleep(interval)
        wall = time.perf_counter() - t0
    # per-process own CPU, last seen (misses at most each process's final 50-200 ms);
    # rusage of reaped children would miss grandchildren whose parent did not wait for them
    tree_cpu = sum(c for c, _ in cpu.values())
    tree_sys = sum(sy for _, sy in cpu.values())
    sampler = time.process_time() - cpu0
    others = max(0.0, _busy_cpu_s() - busy0 - tree_cpu - sampler)
    return {"rc": p.returncode, "wall_s": wall, "samples": samples, "pss_samples": pss_samples,
            "sampler_cpu_s": sampler, "tree_cpu_s": tree_cpu, "tree_sys_s": tree_sys,
            "others_cpu_share": others / (wall * (os.cpu_count() or 1)),
            "read_bytes": _self_read_bytes() - io0, "timeline": timeline, **peak}


# ---------------------------------------------------------------- page cache

def drop_caches() -> bool:
    """Drop the page cache if this kernel lets us (root in a container often may not)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def warm(paths: list[Path]) -> None:
    """Read every input file once so every case starts from the same (warm) cache."""
    buf = bytearray(16 << 20)
    for d in paths:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


# What each tool imports before it reads a byte of the inputs: loaded once after the cache is
# dropped, so that a cold case reads its inputs cold but not its own code (torch's libraries alone
# are ~0.4 GB, which would otherwise count as "bytes read per input byte").
SOFTWARE = {
    "tadrop": [sys.executable, "-c", "import torch, numpy, safetensors, zarr, pyarrow, xxhash, "
               "pipeline.run, pipeline.executor, pipeline.reduce, tadrop"],
    "mergekit": ["{venv_python}", "-c", "import torch, transformers, mergekit.merge, "
                 "mergekit.scripts.run_yaml"],
}


def load_software(tool: str, venv_python: str | None = None) -> None:
    cmd = [c.format(venv_python=venv_python or sys.executable) for c in SOFTWARE[tool]]
    subprocess.run(cmd, cwd=REPO, check=False, capture_output=True)


def cache_state(mode: str, inputs: list[Path], tool: str = "tadrop", venv_python: str | None = None) -> str:
    if mode == "none":
        return "as left by the previous case (neither dropped nor pre-read)"
    if mode in ("auto", "cold") and drop_caches():
        load_software(tool, venv_python)
        return "cold (page cache dropped, then the tool's code loaded: inputs cold, software warm)"
    if mode == "cold":
        return "warm (could not drop the page cache; inputs pre-read)"
    warm(inputs)
    return "warm (inputs pre-read)"


# ---------------------------------------------------------------- data, configs

def ensure_data(data: Path, k: int, seed: int) -> dict:
    """Generate (once) base + k fine-tunes; reuse a cached set that covers them."""
    out = data / "models"
    want = dict(SIZES, dtype="bfloat16", shards=1, seed=seed)
    man = mdm.read_manifest(out)
    if man and all(man["params"][key] == v for key, v in want.items()) and man["params"]["k"] >= k \
            and all(Path(p).exists() for p in [man["base"], *(man["tasks"][n] for n in man["params"]["names"][:k])]):
        return man                             # (a cleanup may have deleted the models past the first few)
    print(f"generating base + {k} fine-tunes (~1.08 GB each) under {out} ...", flush=True)
    man = mdm.make_models(out, **SIZES, k=k, dtype="bfloat16", shards=1, seed=seed)
    print(f"  done in {man['seconds']:.0f} s", flush=True)
    return man


def chunked_share(summary: dict) -> float | None:
    """The share of a plan's input bytes in row-chunked tensors, which the issue lets a merge read
    twice (once for Phi's fit, once for the combine); None for a plan summary without the figure."""
    if "chunked_input_bytes" not in summary or not summary.get("input_bytes"):
        return None
    return summary["chunked_input_bytes"] / summary["input_bytes"]


def tadrop_config(case: Case, man: dict, run_dir: Path) -> str:
    names = man["params"]["names"][: case.k]
    method = {"ties": "ties", "emr_tadrop": "emr", "task_arithmetic": "task_arithmetic"}[case.method]
    sparsify = {"ties": "{kind: topk, density: 0.2, scope: tensor}",
                "emr_tadrop": "{kind: tadrop, a: 0.5, b: 0.95, rescale: norm, scope: tensor}",
                "task_arithmetic": "{kind: none}"}[case.method]
    lines = [f"base: {Path(man['base']).resolve()}", "models:"]
    lines += [f"  - {{name: {n}, path: {Path(man['tasks'][n]).resolve()}}}" for n in names]
    lines += [f"method: {method}", f"sparsify: {sparsify}"]
    if method == "ties":
        lines.append("lambda: 1.0")
    elif method == "task_arithmetic":
        lines.append("lambda: 0.3")
    lines += [f"output: {run_dir}", "output_dtype: bfloat16", "shard_size: 5GB", "seed: 0"]
    return "\n".join(lines) + "\n"


def mergekit_config(case: Case, man: dict) -> str:
    """The same merge for mergekit: float32 arithmetic (as ours), bf16 output.

    TIES: density 0.2, weight 1, normalize (the disjoint mean), lambda 1.
    Task arithmetic: weight 1, no normalize, lambda 0.3 (= theta_0 + 0.3 sum tau).
    """
    names = man["params"]["names"][: case.k]
    params = "{density: 0.2, weight: 1.0}" if case.method == "ties" else "{weight: 1.0}"
    top = "{normalize: true, lambda: 1.0}" if case.method == "ties" else "{normalize: false, lambda: 0.3}"
    lines = [f"merge_method: {case.method}", f"base_model: {Path(man['base']).resolve()}", "models:"]
    for n in names:
        lines += [f"  - model: {Path(man['tasks'][n]).resolve()}", f"    parameters: {params}"]
    lines += [f"parameters: {top}", "dtype: float32", "out_dtype: bfloat16"]
    return "\n".join(lines) + "\n"


def mergekit_venv(data: Path, venv: Path | None = None) -> Path:
    """mergekit-yaml of `venv` (--mergekit-venv), else /work/venvs/mergekit when it exists, else
    bench_data/mergekit-venv created with mergekit 0.1.5 on top of the system torch (never a CUDA one)."""
    if venv is None:
        shared = Path(os.environ.get("MERGEKIT_VENV", "/work/venvs/mergekit"))
        venv = shared if (shared / "bin" / "mergekit-yaml").exists() else data / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    import torch
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    cons = data / "mergekit-constraints.txt"
    # pin what is already installed, so pip reuses it instead of fetching other builds
    pins = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        import transformers
        pins.append(f"transformers=={transformers.__version__}")
    except ImportError:
        pass
    cons.write_text("\n".join(pins) + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", MERGEKIT,
                    "-c", str(cons)], check=True)
    return exe


def tadrop_cmd(args) -> list[str]:
    if args.tadrop:
        return shlex.split(args.tadrop)
    exe = shutil.which("tadrop")
    return [exe] if exe else [sys.executable, "-m", "pipeline.cli"]


def dir_gb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e9 if p.exists() else 0.0


# ---------------------------------------------------------------- cases

def outputs_digest(run_dir: Path) -> str:
    """One hash over every output file's path and bytes (run.json and the state dir excluded)."""
    import hashlib
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = f.relative_to(run_dir)
        if rel.parts[0] in ("run.json", ".tadrop"):
            continue
        h.update(str(rel).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def run_case(case: Case, man: dict, args, data: Path, rnd: int = 0, resume: bool = False) -> Result:
    """One case from scratch; `resume=True` keeps the run directory, so tadrop resumes it."""
    runs, logs, cfgs = data / "runs", data / "logs", data / "configs"
    for d in (runs, logs, cfgs):
        d.mkdir(parents=True, exist_ok=True)
    run_dir, cfg, log = runs / case.name, cfgs / f"{case.name}.yaml", logs / f"{case.name}.log"
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run would be resumed, not re-merged
    notes = []
    if case.tool == "tadrop":
        cfg.write_text(tadrop_config(case, man, run_dir))
        cmd = tadrop_cmd(args) + ["merge", str(cfg), "--workers", str(args.workers),
                                  "--memory-budget", args.memory_budget, "--quiet"]
        if case.executor == "ray":
            cmd += ["--executor", "ray"]
    else:
        cfg.write_text(mergekit_config(case, man))
        cmd = [str(mergekit_venv(data, args.mergekit_venv)), str(cfg), str(run_dir), "--lazy-unpickle",
               "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
        notes.append("mergekit defaults otherwise: CPU, synchronous writes, torch threads = cores")
    inputs = [Path(man["base"])] + [Path(man["tasks"][n]) for n in man["params"]["names"][: case.k]]
    busy = wait_idle(args.wait_idle) if args.wait_idle > 0 else -1.0
    venv_python = (str(mergekit_venv(data, args.mergekit_venv).parent / "python")
                   if case.tool == "mergekit" else None)
    cache = cache_state(args.cache, inputs, case.tool, venv_python)
    seen = f"machine {busy:.0%} busy before" if busy >= 0 else "idle wait off"
    print(f"[{case.name}] {seen}, {cache}; running ...", flush=True)
    m = run_measured(cmd, log, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                     ledger=run_dir / ".tadrop" if case.tool == "tadrop" else None)
    if case.tool == "tadrop" and m["rc"] == 0:
        st = subprocess.run(tadrop_cmd(args) + ["status", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True)
        if st.returncode != 0:
            notes.append(f"tadrop status exit {st.returncode}: run not complete")
    r = Result(case=case.name, tool=case.tool, method=case.method, k=case.k, executor=case.executor,
               rc=m["rc"], wall_s=round(m["wall_s"], 2), peak_rss_gib=round(m["rss"] / GiB, 3),
               peak_anon_gib=round(m["anon"] / GiB, 3), peak_pss_gib=round(m["pss"] / GiB, 3),
               peak_procs=m["procs"], samples=m["samples"], pss_samples=m["pss_samples"],
               cache=cache, busy_before=busy, others_cpu_share=round(m["others_cpu_share"], 3),
               tree_cpu_s=round(m["tree_cpu_s"], 1), sampler_cpu_s=round(m["sampler_cpu_s"], 2),
               tree_sys_s=round(m["tree_sys_s"], 1),
               output_gb=round(dir_gb(run_dir), 3), log=_rel(log), notes=notes,
               input_bytes=sum(f.stat().st_size for d in inputs for f in d.glob("*.safetensors")),
               read_bytes=m["read_bytes"], round=rnd, timeline=m["timeline"] or None)
    r.read_ratio = round(r.read_bytes / r.input_bytes, 4) if r.input_bytes else None
    if case.tool == "tadrop" and r.rc == 0:
        record = json.loads((run_dir / "run.json").read_text())
        r.timings = record.get("timings")
        r.chunked_share = chunked_share(record.get("plan") or {})
        r.digest = outputs_digest(run_dir)
    if case.tool == "tadrop":
        r.target_rss_gib = args.workers * parse_gib(args.memory_budget) + 0.5
        r.target_wall_s = TARGET_WALL.get(case.name.removesuffix("-ray"))
        r.meets_rss = r.rc == 0 and r.peak_rss_gib <= r.target_rss_gib
        if r.target_wall_s is not None:
            r.meets_wall = r.rc == 0 and r.wall_s <= r.target_wall_s
    status = "ok" if r.rc == 0 else f"FAILED rc={r.rc} (see {r.log})"
    print(f"[{case.name}] {status}: {r.wall_s:.1f} s, peak RSS {r.peak_rss_gib:.2f} GiB "
          f"(anon {r.peak_anon_gib:.2f}, PSS {r.peak_pss_gib:.2f}), read {r.read_ratio} x input, "
          f"others used {r.others_cpu_share:.0%} of the cores meanwhile", flush=True)
    if not args.keep_outputs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return r


def resume_test(case: Case, man: dict, args, data: Path, full: Result) -> Result:
    """SIGKILL a run (its whole session) once half the merge bytes are recorded, then re-run
    the same command: the resume must redo at most the jobs that were in flight and give the
    same output bytes as the uninterrupted run `full`."""
    import signal
    runs, logs, cfgs = data / "runs", data / "logs", data / "configs"
    run_dir, cfg = runs / case.name, cfgs / f"{case.name}.yaml"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg.write_text(tadrop_config(case, man, run_dir))
    cmd = tadrop_cmd(args) + ["merge", str(cfg), "--workers", str(args.workers),
                              "--memory-budget", args.memory_budget, "--quiet"]
    state = run_dir / ".tadrop"
    inputs = [Path(man["base"])] + [Path(man["tasks"][n]) for n in man["params"]["names"][: case.k]]
    venv_python = (str(mergekit_venv(data, args.mergekit_venv).parent / "python")
                   if case.tool == "mergekit" else None)
    cache = cache_state(args.cache, inputs, case.tool, venv_python)
    print(f"[{case.name} resume] {cache}; running until half the merge bytes are recorded ...", flush=True)
    log = logs / f"{case.name}-killed.log"
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        jobs, done_b, total_b = [], 0, 1
        while p.poll() is None:
            time.sleep(0.2)
            try:
                jobs = [j for j in json.loads((state / "plan.json").read_text())["jobs"]
                        if j["id"].startswith("merge:")]
            except (OSError, ValueError, KeyError):
                continue
            done = set(_ledger_jobs(state))
            total_b = sum(j["bytes"] for j in jobs) or 1
            done_b = sum(j["bytes"] for j in jobs if j["id"] in done)
            if done_b >= total_b / 2:
                os.killpg(p.pid, signal.SIGKILL)
                break
        p.wait()
    killed_wall = time.perf_counter() - t0
    done = set(_ledger_jobs(state))                # a line torn by the kill is not a record
    undone = [j for j in jobs if j["id"] not in done]
    window = 2 * args.workers                      # LocalExecutor's jobs in flight
    in_flight_b = sum(j["bytes"] for j in undone[:window])
    r = run_case(case, man, argparse.Namespace(**{**vars(args), "keep_outputs": True, "wait_idle": 0}),
                 data, full.round, resume=True)
    r.case = case.name + "-resume"
    fixed_s = full.wall_s - (full.timings or {}).get("map_s", 0.0) - (full.timings or {}).get("reduce_s", 0.0)
    allowance = fixed_s + full.wall_s * in_flight_b / total_b
    extra = killed_wall + r.wall_s - full.wall_s
    r.resume = {"killed_after_s": round(killed_wall, 1), "merge_jobs": len(jobs),
                "jobs_recorded_at_kill": sum(1 for j in jobs if j["id"] in done),
                "bytes_recorded_at_kill": round((total_b - sum(j["bytes"] for j in undone)) / total_b, 3),
                "jobs_in_flight_max": window, "in_flight_bytes_share": round(in_flight_b / total_b, 4),
                "resume_wall_s": r.wall_s, "uninterrupted_wall_s": full.wall_s,
                "extra_s": round(extra, 1), "allowance_s": round(allowance, 1),
                "meets": r.rc == 0 and extra <= allowance,
                "same_bytes_as_uninterrupted": r.digest is not None and r.digest == full.digest}
    tl = full.timeline or {}
    if done and all(j in tl for j in done if j.startswith("merge:")):
        # the same split in time, from the uninterrupted run's ledger timeline: when had it recorded
        # every job the killed run had? Cost is not linear in bytes (small tensors cost more per
        # byte), so this is what the crash cost against that run, part by part.
        t_same = max(tl[j] for j in done if j.startswith("merge:"))
        r.resume.update({
            "uninterrupted_s_to_same_jobs": t_same,
            "killed_run_lost_s": round(killed_wall - t_same, 1),      # work in flight at the kill
            "resume_minus_rest_of_uninterrupted_s": round(r.wall_s - (full.wall_s - t_same), 1),
            "fixed_s": round(fixed_s, 1),
            "in_flight_time_bound_s": round(
                max((tl[j["id"]] for j in undone[:window] if j["id"] in tl), default=t_same) - t_same, 1),
        })
    print(f"[{case.name} resume] {r.resume}", flush=True)
    if not args.keep_outputs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return r


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def parse_gib(s: str) -> float:
    units = {"gib": 1.0, "mib": 1 / 1024, "gb": 1e9 / GiB, "mb": 1e6 / GiB}
    low = s.strip().lower()
    for u, f in units.items():
        if low.endswith(u):
            return float(low[: -len(u)]) * f
    return float(low) / GiB


# ---------------------------------------------------------------- report

def _ratio(a: Result, b: Result | None) -> str:
    if b is None or a.rc or b.rc:
        return ""
    return (f"{a.wall_s / b.wall_s:.2f}x time, {a.tree_cpu_s / b.tree_cpu_s:.2f}x CPU, "
            f"{a.peak_rss_gib / b.peak_rss_gib:.2f}x RSS")


def _median_wall(results: list[Result], name: str) -> float | None:
    walls = [r.wall_s for r in results if r.case == name and r.rc == 0]
    return statistics.median(walls) if walls else None


def _round(r: Result, results: list[Result]) -> str:
    """' (round N)' where the run has several kill-and-resume rounds."""
    return f" (round {r.round})" if sum(1 for x in results if x.resume) > 1 else ""


def verdicts(results: list[Result], meta: dict) -> list[str]:
    """The issue's targets as ratios within this run (medians over --repeats rounds)."""
    med = {r.case: _median_wall(results, r.case) for r in results}
    out = []

    def line(what, value, target, ok, how=""):
        mark = "n/a (case not run)" if ok is None else ("**met**" + how if ok else "**MISSED**")
        out.append(f"| {what} | {value} | {target} | {mark} |")

    mk, ties, emr4 = med.get("mergekit-ties-k4"), med.get("tadrop-ties-k4"), med.get("tadrop-emr_tadrop-k4")
    sp = mk / ties if mk and ties else None
    line("mergekit TIES K=4 wall / tadrop TIES K=4 wall", f"{sp:.1f}x" if sp else "-",
         f">= {TARGET_VS_MERGEKIT:g}x", None if sp is None else sp >= TARGET_VS_MERGEKIT)
    er = emr4 / ties if emr4 and ties else None
    line("EMR + TADrop K=4 wall / TIES K=4 wall", f"{er:.2f}" if er else "-", f"<= {TARGET_EMR_VS_TIES:g}",
         None if er is None else er <= TARGET_EMR_VS_TIES)
    k16, k32 = med.get("tadrop-emr_tadrop-k16"), med.get("tadrop-emr_tadrop-k32")
    kr = k32 / k16 if k16 and k32 else None
    line("EMR + TADrop K=32 wall / K=16 wall", f"{kr:.2f}" if kr else "-", f"<= {TARGET_K32_VS_K16:g}",
         None if kr is None else kr <= TARGET_K32_VS_K16)
    for r in results:
        if r.tool == "tadrop" and r.read_ratio is not None and r.cache.startswith("cold") and r.round == 0 \
                and not r.case.endswith("-resume"):
            twice = r.chunked_share or 0.0         # row-chunked tensors may be read twice
            plain = r.read_ratio <= TARGET_READ_RATIO
            line(f"{r.case}: bytes read from disk / input bytes (cold cache, tensor scope)",
                 f"{r.read_ratio:.3f}", f"<= {TARGET_READ_RATIO:g}" + (
                     f"; row-chunked tensors ({twice:.0%} of the input bytes) may be read twice: "
                     f"<= {TARGET_READ_RATIO + twice:.2f}" if twice else ""),
                 plain or r.read_ratio <= TARGET_READ_RATIO + twice,
                 "" if plain else " (row-chunked tensors read twice, in part)")
    for r in results:
        if r.tool == "tadrop" and r.target_rss_gib is not None and r.round == 0 and r.k >= 16:
            line(f"{r.case}: peak RSS GiB", f"{r.peak_rss_gib:.2f}", f"<= {r.target_rss_gib:g}", r.meets_rss)
        if r.resume:
            x = r.resume
            line(f"{r.case}{_round(r, results)}: kill + resume - uninterrupted wall (s)", f"{x['extra_s']}",
                 f"<= {x['allowance_s']} (start-up + the {x['jobs_in_flight_max']} jobs in flight)", x["meets"])
            if "uninterrupted_s_to_same_jobs" in x:   # the same split, timed on the uninterrupted run
                bound = round(x["fixed_s"] + x["in_flight_time_bound_s"], 1)
                line(f"{r.case}{_round(r, results)}: resume - the uninterrupted run's time after the same jobs (s)",
                     f"{x['resume_minus_rest_of_uninterrupted_s']}",
                     f"<= {bound} (start-up {x['fixed_s']} + the jobs in flight there, "
                     f"{x['in_flight_time_bound_s']}; it had the killed run's jobs at "
                     f"{x['uninterrupted_s_to_same_jobs']} s, the killed run at {x['killed_after_s']} s)",
                     x["resume_minus_rest_of_uninterrupted_s"] <= bound)
            line(f"{r.case}{_round(r, results)}: resumed output bytes == uninterrupted",
                 str(x["same_bytes_as_uninterrupted"]), "True", x["same_bytes_as_uninterrupted"])
    resumed = [r.resume for r in results if r.resume]
    if len(resumed) > 1:   # one run on a shared VM varies by +-5 s: the verdict is on the medians
        extra = statistics.median(x["extra_s"] for x in resumed)
        allow = statistics.median(x["allowance_s"] for x in resumed)
        line(f"kill + resume - uninterrupted wall (s), median of {len(resumed)} rounds",
             f"{extra:.1f} (rounds: {', '.join(str(x['extra_s']) for x in resumed)})",
             f"<= {allow:.1f} (median allowance; rounds: {', '.join(str(x['allowance_s']) for x in resumed)})",
             all(x["same_bytes_as_uninterrupted"] for x in resumed) and extra <= allow)
        timed = [x for x in resumed if "uninterrupted_s_to_same_jobs" in x]
        if len(timed) > 1:
            over = statistics.median(x["resume_minus_rest_of_uninterrupted_s"] for x in timed)
            bound = statistics.median(x["fixed_s"] + x["in_flight_time_bound_s"] for x in timed)
            line(f"resume - the uninterrupted run's time after the same jobs (s), median of {len(timed)} rounds",
                 f"{over:.1f}", f"<= {bound:.1f} (median of start-up + the jobs in flight there)", over <= bound)
    return ["| target | measured | wanted | verdict |", "| --- | ---: | --- | --- |", *out]


def write_report(results: list[Result], meta: dict, out: Path, stem: str = "merge") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]},
                                               indent=2) + "\n")
    mk = {(r.method, r.k): r for r in results if r.tool == "mergekit"}
    label = {"ties": "TIES (top-k 0.2)", "emr_tadrop": "EMR + TADrop", "task_arithmetic": "Task arithmetic"}
    rows = ["| case | round | K | method | executor | wall s | peak RSS GiB | peak anon GiB | peak PSS GiB "
            "| read / input | CPU s (of which system) | others' CPU | vs mergekit (same round) |",
            "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        wall = f"{r.wall_s:.1f}" if r.rc == 0 else f"failed (rc {r.rc})"
        mkr = next((m for m in results if m.tool == "mergekit" and m.method == r.method and m.k == r.k
                    and m.round == r.round), mk.get((r.method, r.k)))
        vs = _ratio(r, mkr) if r.tool == "tadrop" else ""
        rd = f"{r.read_ratio:.3f}" if r.read_ratio is not None else "-"
        rows.append(f"| {r.case} | {r.round} | {r.k} | {label[r.method]} | {r.executor} | {wall} | "
                    f"{r.peak_rss_gib:.2f} | {r.peak_anon_gib:.2f} | {r.peak_pss_gib:.2f} | {rd} | "
                    f"{r.tree_cpu_s:.0f}" + (f" ({r.tree_sys_s:.0f})" if r.tree_sys_s is not None else "")
                    + f" | {r.others_cpu_share:.0%} | {vs} |")
    caches = sorted({r.cache for r in results})
    md = [
        "# Merge benchmark",
        "",
        f"{meta['date']} on **{meta.get('cpu_model', '?')}**, {meta['machine']}; checkpoints: LLaMA-shaped, "
        f"hidden 2048, 8 layers, intermediate 5632, vocab 32000, bf16, {meta['model_gb']:.2f} GB each "
        "(scripts/make_demo_models.py). tadrop runs with "
        f"`--workers {meta['workers']} --memory-budget {meta['memory_budget']}`; the benchmark "
        f"and everything it ran had niceness {meta['nice']} (a shared 2-core machine). "
        f"{meta.get('repeats', 1)} round(s), cases interleaved; verdicts use the median wall per case.",
        "",
        "## Verdicts (ratios within this run)",
        "",
        *verdicts(results, meta),
        "",
        "## Cases",
        "",
        *rows,
        "",
        f"Page cache before each case: {'; '.join(caches)}.",
        "",
        "read / input: bytes the case's process tree read from disk (/proc/self/io read_bytes of the "
        "benchmark, which the kernel credits with its reaped children's I/O) over the bytes of the K + 1 "
        "input checkpoints; with a cold cache that is what came off the disk. A resumed run reads its "
        "remaining inputs again, so its figure is not a tensor-scope figure.",
        "",
        "CPU s: CPU time of the measured process tree; in parentheses the part spent in the kernel "
        "(on this VM mostly filling the page cache: reads of cold inputs, writes of outputs). "
        "Others' CPU: the share of the machine's "
        "cores that everything else (other people's jobs on this shared machine, and kernel "
        "threads such as page-cache writeback) used during the case; a high figure means the wall time "
        "is inflated by contention.",
        "",
        "Memory is the sum over the whole process tree (workers, Ray daemons) from /proc: "
        "RSS and anon every 50 ms, PSS every 2 s. RSS counts the mmap'd input pages a process touched "
        "(page cache, shared and reclaimable), so for mmap readers it overstates what the process owns; "
        "anon is private (heap) memory, what the memory budget bounds; PSS splits shared pages "
        "between the processes mapping them. The target `workers x 2 GiB + 0.5 GiB` is stated "
        "for RSS and judged on RSS here. mergekit computes in float32 (`dtype: float32`, "
        "`out_dtype: bfloat16`), as tadrop does, on the same inputs in the same invocation.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(md))


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return f"{os.cpu_count()} cores, {mem / GiB:.0f} GiB RAM, {platform.platform()}, Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench_data")
    ap.add_argument("--out", type=Path, default=REPO / "bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-budget", default="2GiB")
    ap.add_argument("--mergekit", action="store_true", help="also run mergekit 0.1.5 (own venv)")
    ap.add_argument("--mergekit-only", action="store_true", help="only the mergekit rows")
    ap.add_argument("--ray", action="store_true", help="also run the tadrop cases with --executor ray")
    ap.add_argument("--cases", help="comma-separated case names to keep (e.g. tadrop-ties-k4)")
    ap.add_argument("--cache", choices=["auto", "cold", "warm", "none"], default="auto",
                    help="auto: drop the page cache if permitted, else pre-read the inputs")
    ap.add_argument("--nice", type=int, default=10, help="raise this process's niceness (and the merges') by N")
    ap.add_argument("--tadrop", help="command for tadrop (default: `tadrop` on PATH, else python -m pipeline.cli)")
    ap.add_argument("--wait-idle", type=float, default=300,
                    help="before each case wait up to this many seconds for the machine to be <25%% busy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--mergekit-venv", type=Path, help="venv holding mergekit-yaml (see module docstring)")
    ap.add_argument("--k32", action="store_true", help="also the K = 32 EMR + TADrop case (~35 GB of inputs)")
    ap.add_argument("--resume-test", action="store_true",
                    help="after each round's largest EMR case, SIGKILL a run of it half-way and measure "
                         "the resume against that round's uninterrupted run (with --repeats N: N pairs, "
                         "the verdict on the medians)")
    ap.add_argument("--resume-k", type=int, help="K of the EMR case to kill and resume (default: the largest run)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds over all cases, interleaved (case order rotates); the report gives medians")
    ap.add_argument("--report-only", action="store_true", help="rewrite merge.md from merge.json")
    ap.add_argument("--stem", default="merge", help="result file names: <stem>.json and <stem>.md under --out")
    ap.add_argument("--adapters", action="store_true",
                    help="only the adapter row: K=16 rank-16 LoRA adapters, EMR + TADrop (bench/merge-adapters.*)")
    args = ap.parse_args(argv)
    if args.adapters:
        if args.nice:
            os.nice(args.nice)
        import bench_adapters
        return bench_adapters.main(args)
    if args.report_only:
        saved = json.loads((args.out / f"{args.stem}.json").read_text())
        write_report([Result(**r) for r in saved["results"]], saved["meta"], args.out, args.stem)
        return 0
    args.data = args.data.resolve()
    if args.nice:
        os.nice(args.nice)

    cases = []
    if not args.mergekit_only:
        cases += [Case("tadrop", "ties", 4), Case("tadrop", "emr_tadrop", 4), Case("tadrop", "emr_tadrop", 16)]
        if args.k32:
            cases.append(Case("tadrop", "emr_tadrop", 32))
        if args.mergekit:  # counterparts of the extra mergekit rows
            cases += [Case("tadrop", "ties", 16), Case("tadrop", "task_arithmetic", 4)]
        if args.ray:
            cases += [Case("tadrop", c.method, c.k, "ray") for c in list(cases)]
    if args.mergekit or args.mergekit_only:
        cases += [Case("mergekit", "ties", 4), Case("mergekit", "ties", 16),
                  Case("mergekit", "task_arithmetic", 4)]
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c.name in keep]
    if not cases:
        ap.error("no cases selected")
    if any(c.tool == "tadrop" for c in cases):
        h = subprocess.run(tadrop_cmd(args) + ["merge", "--help"], cwd=REPO, capture_output=True, text=True)
        if h.returncode != 0:
            print("`tadrop merge --help` fails; install the project (bash scripts/setup.sh) first:\n"
                  + h.stderr[-2000:], file=sys.stderr)
            return 2
    if any(c.tool == "mergekit" for c in cases):
        mergekit_venv(args.data, args.mergekit_venv)

    man = ensure_data(args.data, max(c.k for c in cases), args.seed)
    results = []

    def report():   # after every case, so a benchmark cut short still leaves its results
        write_report(results, meta(), args.out, args.stem)

    def meta():
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "workers": args.workers, "memory_budget": args.memory_budget,
            "nice": os.nice(0), "model_gb": man["total_size"] / 1e9, "sizes": SIZES,
            "command": "python3 scripts/bench_merge.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "rss_target_metric": "RSS (sum over the process tree)",
            "cpu_model": cpu_model(), "loadavg_end": list(os.getloadavg()), "repeats": args.repeats,
        }
    emr_ks = [c.k for c in cases if c.tool == "tadrop" and c.method == "emr_tadrop" and c.executor == "local"]
    resume_k = (args.resume_k or max(emr_ks, default=None)) if args.resume_test else None
    for rnd in range(args.repeats):
        order = cases[rnd % len(cases):] + cases[:rnd % len(cases)]   # rotate: no case always first
        for c in order:
            results.append(run_case(c, man, args, args.data, rnd))
            report()
            if c.k == resume_k and c.method == "emr_tadrop" and c.tool == "tadrop" and c.executor == "local" \
                    and results[-1].rc == 0:
                # one kill-and-resume per round, right after the uninterrupted run it is compared with
                results.append(resume_test(c, man, args, args.data, results[-1]))
                report()
    report()
    print(f"wrote {args.out / (args.stem + '.json')} and {args.out / (args.stem + '.md')}")
    return 0 if all(r.rc == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
