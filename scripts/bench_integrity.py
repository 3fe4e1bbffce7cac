#!/usr/bin/env python3
"""What the integrity checks cost on a demo-sized merge (EMR + TADrop, 4 tasks; results in
bench/integrity.{md,json}).

Jobs hash the bytes they write while those bytes are in memory (shard ranges) or just written (Zarr
chunk files, read back from the page cache); the reduce hashes the small metadata files. This script
runs the demo merge, then times exactly that hashing work on the run's outputs (the shard ranges from
memory, the chunk files read and hashed) and compares it with the merge's own wall and CPU time; it also
times `tadrop verify` (a full re-hash) and `tadrop status` (presence and sizes).

    python3 scripts/bench_integrity.py [--data bench_data/integrity] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import xxhash  # noqa: E402

from pipeline import integrity  # noqa: E402


def _cli(*args) -> tuple[float, float]:
    """(wall s, CPU s of the process tree) of one CLI call."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, env=env, check=True,
                   capture_output=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _hash_work(run: Path, repeat: int) -> dict:
    """Time the hashing a merge does: shard ranges from memory, chunk files read + hashed, metadata."""
    sums = json.loads((run / "run.json").read_text())["checksums"]
    ranges = []
    for out in ("merged", "unified"):
        for _, (fname, offset, nbytes, _, _) in sums.get(out, {}).items():
            with open(run / out / fname, "rb") as f:
                f.seek(offset)
                ranges.append(f.read(nbytes))
    chunks = [run / "masks.zarr" / e["array"] / k for e in sums.get("masks", {}).values() for k in e["chunks"]]
    files = [run / rel for rel in sums.get("files", {})]
    best = {"ranges_s": 1e9, "chunks_s": 1e9, "files_s": 1e9}
    for _ in range(repeat):
        t = time.perf_counter()
        for b in ranges:
            xxhash.xxh3_64_hexdigest(b)
        best["ranges_s"] = min(best["ranges_s"], time.perf_counter() - t)
        t = time.perf_counter()
        for p in chunks:
            xxhash.xxh3_64_hexdigest(p.read_bytes())
        best["chunks_s"] = min(best["chunks_s"], time.perf_counter() - t)
        t = time.perf_counter()
        for p in files:
            xxhash.xxh3_64_hexdigest(p.read_bytes())
        best["files_s"] = min(best["files_s"], time.perf_counter() - t)
    best.update(range_bytes=sum(map(len, ranges)), chunk_files=len(chunks),
                chunk_bytes=sum(p.stat().st_size for p in chunks), metadata_files=len(files))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench_data" / "integrity")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    models = args.data / "models"
    if not (models / "demo_models.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_models.py"), "--out", str(models),
                        "--quiet"], check=True)
    run = args.data / "run"
    cfg = args.data / "demo.yaml"
    text = (REPO / "configs" / "demo.yaml").read_text().replace("demo/", f"{models}/")
    cfg.write_text(text.replace("output: runs/demo", f"output: {run}"))

    merges = []
    for _ in range(2):
        shutil.rmtree(run, ignore_errors=True)
        merges.append(_cli("merge", cfg, "--quiet"))
    wall, cpu = min(merges)
    record = json.loads((run / "run.json").read_text())
    work = _hash_work(run, args.repeat)
    hash_s = work["ranges_s"] + work["chunks_s"] + work["files_s"]
    verify = min(_cli("verify", run) for _ in range(args.repeat))
    status = min(_cli("status", run) for _ in range(args.repeat))
    t = time.perf_counter()
    rep = integrity.verify(run)
    verify_inproc = time.perf_counter() - t
    assert rep.ok, rep.problems
    result = {
        "merge_wall_s": round(wall, 3), "merge_cpu_s": round(cpu, 3),
        "merge_map_s": record["timings"].get("map_s"), "merge_reduce_s": record["timings"].get("reduce_s"),
        "hash_in_jobs_s": round(work["ranges_s"] + work["chunks_s"], 4),
        "hash_in_reduce_s": round(work["files_s"], 4),
        "hash_total_s": round(hash_s, 4),
        "overhead_of_cpu_pct": round(100 * hash_s / cpu, 3),
        "overhead_of_wall_pct": round(100 * hash_s / wall, 3),
        "hashed_range_bytes": work["range_bytes"], "chunk_files": work["chunk_files"],
        "chunk_bytes": work["chunk_bytes"], "metadata_files": work["metadata_files"],
        "verify_cli_wall_s": round(verify[0], 3), "verify_in_process_s": round(verify_inproc, 4),
        "status_cli_wall_s": round(status[0], 3),
        "run_json_bytes": (run / "run.json").stat().st_size,
        "load_average_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
    }
    out = REPO / "bench"
    (out / "integrity.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Integrity overhead on the demo merge (EMR + TADrop, 4 tasks, bf16)", "",
          "`python3 scripts/bench_integrity.py`; the merge is the best of 2 runs (wall), the hashing the "
          f"best of {args.repeat}. The machine's load average was {result['load_average_1m']:.1f} on "
          f"{result['cpus']} cores (shared), so wall times are inflated; the hashing times are CPU-bound.", "",
          "| what | value |", "| --- | ---: |"]
    md += [f"| {k} | {v} |" for k, v in result.items()]
    md += ["", f"Hashing costs {result['hash_total_s']:.4f} s against {result['merge_cpu_s']:.1f} CPU s "
           f"for the merge: {result['overhead_of_cpu_pct']:.2f}% of its CPU time "
           f"({result['overhead_of_wall_pct']:.2f}% of its wall time)."]
    (out / "integrity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
