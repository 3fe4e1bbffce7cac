"""Start-up of a small merge: the demo's (scripts/demo.sh) 40 MB EMR + TADrop merge through the CLI,
in the driver (the default for small merges), on spawned workers, and on Ray -> bench/startup.md.

Each case is a fresh `tadrop merge` process (interpreter, imports, plan, map, reduce, exit), timed
wall and CPU (the process tree's user + system).  The machine is shared: the best of N is the
headline, the load average before each run is recorded, and CPU seconds are the steadier figure
(the in-driver merge is one thread: its CPU seconds are what it takes on an idle machine).

    python3 scripts/bench_startup.py [--repeats 3] [--no-ray]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 3.0
CASES = {  # name -> (extra CLI flags, environment)
    "local, in the driver (default)": ([], {}),
    "local, 2 spawned workers": ([], {"TADROP_INLINE_BYTES": "0"}),
    "ray, private local instance, 2 actors": (["--executor", "ray"], {}),
}


def _run(args: list[str], env_extra: dict) -> tuple[float, float, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        last = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1:] or ["(no message)"]
        raise RuntimeError(f"exit {proc.returncode}: {last[0][:300]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "startup.md")
    a = ap.parse_args()
    if not (REPO / "demo" / "demo_models.json").exists():
        subprocess.run([sys.executable, "scripts/make_demo_models.py", "--out", "demo"], cwd=REPO, check=True)
    rows, runs, failures = [], [], []
    floor = [_run(["-c", "import torch"], {}) for _ in range(a.repeats)]
    for name, (flags, env) in CASES.items():
        if a.no_ray and "ray" in name:
            continue
        res = []
        for i in range(a.repeats):
            out = Path("/tmp") / f"tadrop-bench-startup-{os.getpid()}"
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            try:
                wall, cpu, _ = _run(["-m", "pipeline.cli", "merge", "configs/demo.yaml", str(out), "--quiet",
                                     *flags], env)
            except RuntimeError as e:          # e.g. Ray's start-up timing out on an overloaded machine
                failures.append((name, i, load, str(e)))
                continue
            finally:
                timings = (json.loads((out / "run.json").read_text()).get("timings", {})
                           if (out / "run.json").exists() else {})
                shutil.rmtree(out, ignore_errors=True)
            res.append((wall, cpu, load, timings))
            runs.append((name, i, wall, cpu, load, timings))
        if not res:
            continue
        best = min(res, key=lambda r: r[0])
        rows.append((name, best, sorted(r[0] for r in res)[len(res) // 2], min(r[1] for r in res)))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Start-up: the demo merge end to end", "",
             f"{when} on {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}; "
             f"shared with other jobs (load average before each run below). `tadrop merge configs/demo.yaml` "
             f"(EMR + TADrop, 4 fine-tunes of 8 MB, 39.5 MB read), best of {a.repeats}; "
             f"`python -c 'import torch'` alone: {min(f[0] for f in floor):.2f} s wall, "
             f"{min(f[1] for f in floor):.2f} s CPU.", "",
             "| case | wall s (best / median) | CPU s (best) | load before (best run) | plan s | map s | reduce s | target |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, (wall, cpu, load, t), med, cpu_min in rows:
        lines.append(f"| {name} | {wall:.2f} / {med:.2f} | {cpu_min:.2f} | {load:.1f} | {t.get('plan_s', '')} | "
                     f"{t.get('map_s', '')} | {t.get('reduce_s', '')} | "
                     f"{'<= %.0f s' % TARGET_S if 'driver' in name else ''} |")
    drv = next(r for r in rows if "driver" in r[0])
    met = drv[1][0] <= TARGET_S
    idle = drv[3] <= TARGET_S
    torch_floor = min(f[0] for f in floor)
    busy = drv[1][2] > 1.5
    if met:
        verdict = "met: %.2f s wall" % drv[1][0]
    elif busy:
        verdict = ("not met on this busy machine (%.2f s wall at load %.1f); the in-driver merge is one thread, "
                   "so its %.2f s of CPU is what it takes on an idle core: %s"
                   % (drv[1][0], drv[1][2], drv[3], "within the target" if idle else "over the target"))
    else:
        verdict = ("not met: %.2f s wall on an idle machine (load %.1f), of which starting Python and "
                   "importing torch alone take %.2f s (`python -c 'import torch'`, above); the merge's own "
                   "work (plan %.2f s, map %.2f s, reduce %.2f s) and the other imports make up the rest"
                   % (drv[1][0], drv[1][2], torch_floor, float(drv[1][3].get("plan_s", 0)),
                      float(drv[1][3].get("map_s", 0)), float(drv[1][3].get("reduce_s", 0))))
    lines += ["", f"**Verdict (target: the demo merge in <= {TARGET_S:.0f} s wall, local executor, idle 2-core "
              f"machine):** {verdict}.", "",
              "Small merges (under 256 MB of input, or `workers: 1`) run in the driver: no worker has to "
              "start a fresh interpreter and import torch. Larger ones start the workers once per run "
              "and reuse them across phases; the progress line says `starting N worker processes` until "
              "the first result. Ray's figure includes starting a private local instance and its actors "
              "(on a running cluster only the actors start).", "",
              "## Every run", "", "| case | # | wall s | CPU s | load before | timings |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, i, wall, cpu, load, t in runs:
        lines.append(f"| {name} | {i} | {wall:.2f} | {cpu:.2f} | {load:.1f} | "
                     + ", ".join(f"{k} {v}" for k, v in t.items()) + " |")
    for name, i, load, why in failures:
        lines.append(f"| {name} | {i} | failed | | {load:.1f} | {why.replace('|', '/')} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
