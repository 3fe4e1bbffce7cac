#!/usr/bin/env python3
"""Ray executor vs local executor on the pipeline benchmark's K=4 merges, in one run.

Same inputs as scripts/bench_merge.py (LLaMA-shaped, ~1.08 GB bf16 each, cached under bench_data/),
same CLI (`tadrop merge ... --workers 2`), once with `--executor local` and once with
`--executor ray` (a private local Ray instance, 2 actors), alternating the order on each repeat.
Ray's start-up (instance + actors) is read from the driver's log and reported apart from the
merge; the outputs of the two executors are compared byte for byte. A second section times the
executors alone: merges run inside this process with Ray's actors already started.

    python3 scripts/bench_ray.py                       # ties-k4 and emr_tadrop-k4, 3 repeats each
    python3 scripts/bench_ray.py --repeats 1 --warm-repeats 0 --methods emr_tadrop

Writes bench/ray.json and bench/ray.md.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(1, str(REPO))
import bench_merge as bm  # noqa: E402

CONNECT = re.compile(r"ray: connected to the (.+?) in ([0-9.]+) s")
ACTORS = re.compile(r"ray: first actor ready in ([0-9.]+) s")
DISCONNECT = re.compile(r"ray: disconnected from the .+? in ([0-9.]+) s")
TARGET_RATIO = 1.15


def digest(run: Path) -> dict[str, str]:
    """sha256 of every output file (run.json and the .tadrop working state aside)."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if p.is_file() and rel.parts[0] not in (".tadrop", "run.json"):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
            out[str(rel)] = h.hexdigest()
    return out


def run_one(method: str, executor: str, rep: int, man: dict, args) -> dict:
    data = args.data
    name = f"ray-bench-{method}-k{args.k}-{executor}"
    run_dir, log = data / "runs" / name, data / "logs" / f"{name}-{rep}.log"
    cfg = data / "configs" / f"{name}.yaml"
    for d in (run_dir.parent, log.parent, cfg.parent):
        d.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg.write_text(bm.tadrop_config(bm.Case("tadrop", method, args.k, executor), man, run_dir))
    nice = ["nice", "-n", str(args.nice)] if args.nice else []
    cmd = nice + bm.tadrop_cmd(args) + ["merge", str(cfg), "--workers", str(args.workers),
                                        "--memory-budget", args.memory_budget, "--executor", executor]
    inputs = [Path(man["base"])] + [Path(man["tasks"][n]) for n in man["params"]["names"][: args.k]]
    busy = bm.wait_idle(args.wait_idle) if args.wait_idle > 0 and hasattr(bm, "wait_idle") else None
    cache = bm.cache_state(args.cache, inputs)
    print(f"[{name} #{rep}] {cache}; running ...", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_ADDRESS="")
    m = bm.run_measured(cmd, log, env=env)
    text = log.read_text(errors="replace")
    c, a, d = CONNECT.search(text), ACTORS.search(text), DISCONNECT.search(text)
    timings = {}
    if (run_dir / "run.json").exists():
        timings = json.loads((run_dir / "run.json").read_text()).get("timings", {})
    r = {"method": method, "k": args.k, "executor": executor, "repeat": rep, "rc": m["rc"],
         "wall_s": round(m["wall_s"], 2), "peak_rss_gib": round(m["rss"] / bm.GiB, 3),
         "peak_anon_gib": round(m["anon"] / bm.GiB, 3), "peak_procs": m["procs"], "cache": cache, "busy_before": busy,
         "ray_connect_s": float(c.group(2)) if c else None, "ray_actors_s": float(a.group(1)) if a else None,
         "ray_shutdown_s": float(d.group(1)) if d else None,
         "map_s": timings.get("map_s"), "reduce_s": timings.get("reduce_s"), "log": bm._rel(log)}
    startup = (r["ray_connect_s"] or 0) + (r["ray_actors_s"] or 0) + (r["ray_shutdown_s"] or 0)
    r["ray_startup_s"] = round(startup, 2) if executor == "ray" else None
    r["wall_minus_startup_s"] = round(r["wall_s"] - startup, 2)
    r["digest"] = digest(run_dir) if m["rc"] == 0 and not args.no_verify else None
    status = "ok" if m["rc"] == 0 else f"FAILED rc={m['rc']} (see {r['log']})"
    extra = f", Ray start-up + shutdown {startup:.1f} s" if executor == "ray" else ""
    print(f"[{name} #{rep}] {status}: {r['wall_s']:.1f} s{extra}", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return r


def summarize(results: list[dict], key: str = "wall_s") -> list[dict]:
    """Per method: the best (min) and median of each executor; min is the least disturbed by a shared machine."""
    rows = []
    for method in sorted({r["method"] for r in results}):
        by = {e: [r for r in results if r["method"] == method and r["executor"] == e and r["rc"] == 0]
              for e in ("local", "ray")}
        if not by["local"] or not by["ray"]:
            rows.append({"method": method, "error": "a run failed"})
            continue
        best = {e: min(r[key] for r in rs) for e, rs in by.items()}
        med = {e: statistics.median(r[key] for r in rs) for e, rs in by.items()}
        row = {"method": method, "k": by["local"][0]["k"], "runs": len(by["local"]),
               "local_min_s": best["local"], "ray_min_s": best["ray"],
               "local_median_s": med["local"], "ray_median_s": med["ray"],
               "ratio_min": round(best["ray"] / best["local"], 3),
               "ratio_median": round(med["ray"] / med["local"], 3)}
        if by["ray"][0].get("ray_startup_s") is not None:
            net = min(r["wall_minus_startup_s"] for r in by["ray"])
            row.update(ray_startup_min_s=min(r["ray_startup_s"] for r in by["ray"]),
                       ray_startup_median_s=statistics.median(r["ray_startup_s"] for r in by["ray"]),
                       ray_minus_startup_min_s=net, ratio_minus_startup=round(net / best["local"], 3))
        digests = [r["digest"] for r in by["local"] + by["ray"] if r.get("digest") is not None]
        row["identical_bytes"] = all(d == digests[0] for d in digests) if len(digests) > 1 else None
        if row["identical_bytes"] is False:
            row["differing_files"] = sorted({f for d in digests[1:] for f in set(d) | set(digests[0])
                                             if d.get(f) != digests[0].get(f)})[:20]
        rows.append(row)
    return rows


def warm_inprocess(methods: list[str], man: dict, args) -> list[dict]:
    """The executors alone: merges run in this process, Ray's instance and actors started once beforehand.

    The local executor still starts its worker pool in each phase (that is how it works); the Ray
    actors persist, as they do across the phases of one run.
    """
    import ray

    from cluster.actors import ActorResources
    from cluster.ray_executor import ACTOR_OVERHEAD, RayExecutor
    from pipeline.config import load_config, parse_size
    from pipeline.executor import LocalExecutor
    from pipeline.run import merge

    if args.nice:
        os.nice(args.nice)
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
             object_store_memory=256 * 2**20, logging_level="warning")
    rex = RayExecutor(args.workers, resources=ActorResources(
        memory=parse_size(args.memory_budget) + ACTOR_OVERHEAD))
    out = []
    try:
        for method in methods:
            cfg_path = args.data / "configs" / f"ray-bench-{method}-k{args.k}-warm.yaml"
            run_dir = args.data / "runs" / f"ray-bench-{method}-k{args.k}-warm"
            cfg_path.write_text(bm.tadrop_config(bm.Case("tadrop", method, args.k), man, run_dir))
            cfg = load_config(cfg_path, {"workers": args.workers, "memory_budget": args.memory_budget})
            inputs = [Path(man["base"])] + [Path(man["tasks"][n]) for n in man["params"]["names"][: args.k]]

            def once(ex) -> float:
                shutil.rmtree(run_dir, ignore_errors=True)
                bm.cache_state(args.cache, inputs)
                t0 = time.perf_counter()
                merge(cfg, quiet=True, executor=ex)
                return round(time.perf_counter() - t0, 2)

            once(rex)  # start the actors; not timed
            for rep in range(args.warm_repeats):
                for name in (("local", "ray") if rep % 2 == 0 else ("ray", "local")):
                    if args.wait_idle > 0 and hasattr(bm, "wait_idle"):
                        bm.wait_idle(args.wait_idle)
                    wall = once(LocalExecutor(args.workers) if name == "local" else rex)
                    print(f"[warm {method} {name} #{rep}] {wall:.1f} s", flush=True)
                    out.append({"method": method, "k": args.k, "executor": name, "repeat": rep, "rc": 0,
                                "wall_s": wall})
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        rex.close()
        ray.shutdown()
    return out


def write_report(results: list[dict], rows: list[dict], warm: list[dict], warm_rows: list[dict],
                 meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "digest"} for r in results]
    (out / "ray.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": slim,
                                              "warm_summary": warm_rows, "warm_runs": warm}, indent=2) + "\n")
    label = {"ties": "TIES (top-k 0.2)", "emr_tadrop": "EMR + TADrop", "task_arithmetic": "Task arithmetic"}
    pct = round((TARGET_RATIO - 1) * 100)
    md = ["# Ray executor vs local executor", "",
          f"{meta['date']} on {meta['machine']} (shared with other jobs: the best of {meta['repeats']} runs "
          "is the headline, the median is beside it). Inputs: LLaMA-shaped bf16 checkpoints of "
          f"{meta['model_gb']:.2f} GB (scripts/make_demo_models.py, as scripts/bench_merge.py), K={meta['k']}, "
          f"page cache warm; `tadrop merge --workers {meta['workers']} --memory-budget {meta['memory_budget']}` "
          f"under `nice -n {meta['nice']}`, `--executor local` (processes) against `--executor ray` (a private "
          f"local Ray instance, {meta['workers']} actors of 1 CPU), order alternated.", "",
          "## The CLI end to end (each run starts its own workers)", "",
          "| merge | local s (min / median) | Ray s (min / median) | Ray start-up + shutdown s | Ray minus those s "
          f"| ratio | ratio minus start-up | within {pct}% | identical bytes |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        if "error" in r:
            md.append(f"| {label[r['method']]} | {r['error']} | | | | | | | |")
            continue
        same = {True: "yes", False: "**no**", None: "not checked"}[r["identical_bytes"]]
        ok = "yes" if r["ratio_minus_startup"] <= TARGET_RATIO else "**no**"
        md.append(f"| {label[r['method']]} K={r['k']} | {r['local_min_s']:.1f} / {r['local_median_s']:.1f} | "
                  f"{r['ray_min_s']:.1f} / {r['ray_median_s']:.1f} | {r['ray_startup_min_s']:.1f} / "
                  f"{r['ray_startup_median_s']:.1f} | {r['ray_minus_startup_min_s']:.1f} | {r['ratio_min']:.2f} | "
                  f"{r['ratio_minus_startup']:.2f} | {ok} | {same} |")
    md += ["", "Wall time is the whole CLI process (plan, map, reduce, exit). Ray start-up + shutdown = starting "
           "the private instance (`ray.init(address=\"local\")`), the first actor's `setup` answer and "
           "`ray.shutdown()`, read from the driver's log; on a cluster joined through `ray job submit` the "
           "instance already runs: only the actors start, and the driver only disconnects.", ""]
    if warm_rows:
        md += ["## The executors alone (in one process, Ray's actors already started)", "",
               "| merge | local s (min / median) | Ray s (min / median) | ratio (min) | ratio (median) "
               f"| within {pct}% |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in warm_rows:
            if "error" in r:
                continue
            md.append(f"| {label[r['method']]} K={r['k']} | {r['local_min_s']:.1f} / {r['local_median_s']:.1f} | "
                      f"{r['ray_min_s']:.1f} / {r['ray_median_s']:.1f} | {r['ratio_min']:.2f} | "
                      f"{r['ratio_median']:.2f} | {'yes' if r['ratio_min'] <= TARGET_RATIO else '**no**'} |")
        md += ["", "The local executor starts a fresh process pool in each `run` call (about a second per phase); "
               "the Ray actors persist across runs, as they do across the phases of one run.", ""]
    md += ["## Every run", "",
           "| run | executor | wall s | start-up + shutdown s | map s | reduce s | peak RSS GiB | busy before |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        busy = f"{r['busy_before']:.0%}" if isinstance(r.get("busy_before"), float) and r["busy_before"] >= 0 else ""
        md.append(f"| {r['method']} #{r['repeat']} | {r['executor']} | {r['wall_s']:.1f} | "
                  f"{r['ray_startup_s'] if r['ray_startup_s'] is not None else ''} | {r['map_s']} | "
                  f"{r['reduce_s']} | {r['peak_rss_gib']:.2f} | {busy} |")
    md += ["", f"Command: `{meta['command']}`", ""]
    (out / "ray.md").write_text("\n".join(md))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench_data")
    ap.add_argument("--out", type=Path, default=REPO / "bench")
    ap.add_argument("--methods", default="ties,emr_tadrop", help="comma-separated: ties, emr_tadrop, task_arithmetic")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-budget", default="2GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warm-repeats", type=int, default=3, help="in-process runs with warm actors (0: skip)")
    ap.add_argument("--wait-idle", type=float, default=120,
                    help="before each run wait up to this many seconds for the shared machine to be mostly idle")
    ap.add_argument("--cache", choices=["auto", "cold", "warm"], default="warm",
                    help="warm (default): inputs pre-read before each run, the fair comparison of executors")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--tadrop", help="command for tadrop (default: `tadrop` on PATH, else python -m pipeline.cli)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-verify", action="store_true", help="skip the byte-for-byte comparison")
    args = ap.parse_args(argv)
    args.data = args.data.resolve()
    methods = args.methods.split(",")

    man = bm.ensure_data(args.data, args.k, args.seed)
    results = []
    for rep in range(args.repeats):
        order = ("local", "ray") if rep % 2 == 0 else ("ray", "local")
        for method in methods:
            for executor in order:
                results.append(run_one(method, executor, rep, man, args))
    rows = summarize(results)
    warm = warm_inprocess(methods, man, args) if args.warm_repeats > 0 else []
    warm_rows = summarize(warm) if warm else []
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": bm.machine(), "workers": args.workers, "memory_budget": args.memory_budget,
            "k": args.k, "repeats": args.repeats, "nice": args.nice, "model_gb": man["total_size"] / 1e9,
            "command": "python3 scripts/bench_ray.py " + shlex.join(argv if argv is not None else sys.argv[1:])}
    write_report(results, rows, warm, warm_rows, meta, args.out)
    for r in rows + warm_rows:
        print(json.dumps(r))
    print(f"wrote {args.out / 'ray.json'} and {args.out / 'ray.md'}")
    return 0 if all(r["rc"] == 0 for r in results) and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
