#!/usr/bin/env python3
"""Task-bank benchmark: memory of one bank serving K tasks against K loaded task models, and
`TaskBank.switch` latency against `from_pretrained` of the exported task directory.

On an EMR + TADrop run of K = 8 fine-tunes of the 1.08 GB LLaMA-shaped model (bf16, hidden 2048,
8 layers; scripts/make_demo_models.py, cached under bench_data/ like scripts/bench_merge.py):

- memory: a fresh process imports torch and transformers (its RSS then is the runtime, reported
  apart), opens the bank and builds one live model; its RSS increase is judged against
  `(base + unified + model + K/8 bytes per parameter) x 1.1`. A second fresh process loads the K
  exported task models with `from_pretrained` and reports its RSS increase the same way.
- latency: `switch` between different tasks (the live model's weights rewritten in place), against
  `from_pretrained` of one exported directory with its files in the page cache (read just before)
  followed by one read of every weight page (transformers maps safetensors lazily: the call alone
  returns before any weight is loaded, and is reported apart); the target is >= 10x faster on CPU. With a CUDA device the same runs on it too.

    python3 scripts/bench_bank.py               # -> bench/bank.md, bench/bank.json
    python3 scripts/bench_bank.py --keep        # keep the run and the exports under bench_data/

The run and exports are deleted at the end unless --keep (the generated checkpoints stay cached).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

SIZES = dict(hidden=2048, layers=8, intermediate=5632, vocab=32000, heads=16, kv_heads=16)
K = 8
GB = 1e9


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _touch(model) -> None:
    """Read one element of every 4 KiB page of every weight: `from_pretrained` maps the safetensors
    files lazily, so until a page is touched it is neither loaded nor counted in RSS."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            float(flat[:: max(1, 4096 // p.element_size())].float().sum())


def _drop_page_cache() -> bool:
    """Empty the page cache (root only): a task whose checkpoint is not cached comes off the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _warm(d: Path) -> None:
    for f in sorted(Path(d).rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


# ---------------------------------------------------------------- measured in fresh processes

def measure_bank(run: Path, export_dir: Path, device: str, repeats: int) -> dict:
    import gc

    import torch
    import transformers  # noqa: F401  (the runtime, counted apart)

    from pipeline.bank import TaskBank
    gc.collect()
    r0, a0 = rss(), anon()
    t = time.perf_counter()
    bank = TaskBank.open(run, device=device)
    t_open = time.perf_counter() - t
    tasks = bank.tasks
    t = time.perf_counter()
    model = bank.model(tasks[0])
    t_model = time.perf_counter() - t
    gc.collect()
    r1, a1 = rss(), anon()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    switches = []
    for i in range(repeats * len(tasks)):
        task = tasks[(i + 1) % len(tasks)]
        sync()
        t = time.perf_counter()
        bank.switch(model, task)
        sync()
        switches.append(time.perf_counter() - t)
    loads, lazy = [], []
    where = {"device_map": device} if device == "cuda" else {}
    target_dir = export_dir / tasks[0]
    for _ in range(repeats):
        _warm(target_dir)
        sync()
        t = time.perf_counter()
        m = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=model.dtype, **where)
        sync()
        lazy.append(time.perf_counter() - t)
        _touch(m)                      # every weight in memory: what a switched model already is
        sync()
        loads.append(time.perf_counter() - t)
        del m
        gc.collect()
    cold = []
    if device == "cpu" and _drop_page_cache():   # the exported files off the disk, as K > RAM would be
        t = time.perf_counter()
        m = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=model.dtype)
        _touch(m)
        cold.append(time.perf_counter() - t)
        del m
        gc.collect()
    # the switched model generates like the exported one
    ids = torch.tensor([[1, 5, 9, 2, 33, 7, 11, 4]], device=device)
    bank.switch(model, tasks[0])
    ref = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=model.dtype, **where)
    with torch.no_grad():
        same = bool(torch.equal(model(ids).logits, ref(ids).logits))
    params = sum(p.numel() for p in model.parameters())
    return {
        "device": device, "tasks": len(tasks), "params": params,
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "bank_bytes": bank.memory_bytes(), "runtime_rss": r0, "rss_increase": r1 - r0,
        "anon_increase": a1 - a0, "cuda_allocated": torch.cuda.memory_allocated() if device == "cuda" else None,
        "open_s": t_open, "model_s": t_model, "switch_s": switches, "from_pretrained_s": loads,
        "from_pretrained_lazy_s": lazy, "from_pretrained_cold_s": cold,
        "logits_equal_export": same, "storage": bank.storage,
    }


def measure_separate(export_dir: Path, tasks: list[str]) -> dict:
    import gc

    import torch
    import transformers
    gc.collect()
    r0, a0 = rss(), anon()
    models, t = [], time.perf_counter()
    for task in tasks:
        models.append(transformers.AutoModelForCausalLM.from_pretrained(export_dir / task,
                                                                        dtype=torch.bfloat16))
        _touch(models[-1])             # mapped lazily: count the pages a served model holds
    gc.collect()
    return {"rss_increase": rss() - r0, "anon_increase": anon() - a0, "load_s": time.perf_counter() - t,
            "model_bytes": sum(p.numel() * p.element_size() for m in models for p in m.parameters())}


def _child(kind: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench_bank: child {kind} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- driver

def ensure_models(data: Path) -> dict:
    import make_demo_models as mdm
    out = data / "models"
    man = mdm.read_manifest(out)
    want = dict(SIZES, dtype="bfloat16", shards=1, seed=0)
    if man and all(man["params"][k] == v for k, v in want.items()) and man["params"]["k"] >= K:
        return man
    print(f"generating base + {K} fine-tunes (~1.08 GB each) under {out} ...", flush=True)
    return mdm.make_models(out, **SIZES, k=K, dtype="bfloat16", shards=1, seed=0)


def merge_run(man: dict, data: Path) -> tuple[Path, float]:
    run = data / "bank_run"
    names = man["params"]["names"][:K]
    lines = [f"base: {Path(man['base']).resolve()}", "models:"]
    lines += [f"  - {{name: {n}, path: {Path(man['tasks'][n]).resolve()}}}" for n in names]
    lines += ["method: emr", "sparsify: {kind: tadrop, a: 0.5, b: 0.95, rescale: norm, scope: tensor}",
              f"output: {run}", "output_dtype: bfloat16", "shard_size: 5GB", "seed: 0",
              "workers: 2", "memory_budget: 2GiB"]
    cfg = data / "bank_run.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    t = time.time()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "merge", str(cfg), "--quiet"], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    return run, time.time() - t


def verdict(ok: bool) -> str:
    return "**yes**" if ok else "**no**"


def write_report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bank.json").write_text(json.dumps(res, indent=1) + "\n")
    cpu = res["cpu"]
    st = cpu["storage"]
    n, k = cpu["params"], cpu["tasks"]
    target = (st["base_bytes"] + st["unified_bytes"] + cpu["model_bytes"] + k / 8 * n) * 1.1
    sw, fp = statistics.median(cpu["switch_s"]), statistics.median(cpu["from_pretrained_s"])
    sep = res["separate"]
    lines = [
        "# Task bank benchmark", "",
        f"{res['when']} on {res['machine']}; run: EMR + TADrop (tensor scope, norm rescale), K = {k} "
        f"fine-tunes of the LLaMA-shaped model (hidden 2048, 8 layers, bf16, "
        f"{st['base_bytes'] / GB:.2f} GB each, {n:,} parameters; scripts/make_demo_models.py); " +
        (f"merge {res['merge_s']:.0f} s, `export --all` {res['export_all_s']:.0f} s for {k} tasks. "
         if res.get("merge_s") and res.get("export_all_s") else "") +
        "Measured in fresh processes with torch and transformers already imported; torch threads: "
        f"{res['threads']}.", "",
        "## Memory (CPU)", "",
        "| what | GB |", "| --- | ---: |",
        f"| bank + one live model: RSS increase | {cpu['rss_increase'] / GB:.3f} |",
        f"| of which anonymous (private) memory | {cpu['anon_increase'] / GB:.3f} |",
        f"| bank's own tensors: base {cpu['bank_bytes']['base'] / GB + cpu['bank_bytes']['fixed'] / GB:.3f}, "
        f"unified {cpu['bank_bytes']['unified'] / GB:.3f}, packed masks {cpu['bank_bytes']['masks'] / GB:.3f} "
        f"| {sum(cpu['bank_bytes'].values()) / GB:.3f} |",
        f"| live model's parameters | {cpu['model_bytes'] / GB:.3f} |",
        f"| target: (base + unified + model + K/8 B x params) x 1.1 | {target / GB:.3f} |",
        f"| {k} task models loaded separately (`from_pretrained` x {k}, every weight page read): RSS "
        f"increase | {sep['rss_increase'] / GB:.3f} |",
        f"| of which anonymous (the rest is the mapped checkpoint files' page cache) | "
        f"{sep['anon_increase'] / GB:.3f} |",
        f"| their parameters | {sep['model_bytes'] / GB:.3f} |",
        f"| process runtime before (python, torch, transformers), not counted above | "
        f"{cpu['runtime_rss'] / GB:.3f} |", "",
        f"Verdict, memory within target: {verdict(cpu['rss_increase'] <= target)} "
        f"({cpu['rss_increase'] / target:.2f} of the target; {cpu['rss_increase'] / sep['rss_increase']:.2f}x "
        f"the memory of {k} separately loaded task models).", "",
        "## Latency (CPU, page cache warm)", "",
        "| what | median s | all runs s |", "| --- | ---: | --- |",
        f"| `bank.switch(model, task)` (to a different task) | {sw:.3f} | "
        f"{', '.join(f'{x:.2f}' for x in cpu['switch_s'])} |",
        f"| `from_pretrained` of the exported task dir, then one read of every weight page | {fp:.3f} | "
        f"{', '.join(f'{x:.2f}' for x in cpu['from_pretrained_s'])} |",
        f"| of which the `from_pretrained` call alone (maps the files lazily) | "
        f"{statistics.median(cpu.get('from_pretrained_lazy_s') or [float('nan')]):.3f} | "
        f"{', '.join(f'{x:.2f}' for x in cpu.get('from_pretrained_lazy_s', []))} |",
        *([f"| the same with the page cache emptied first (the files come off the disk) | "
           f"{cpu['from_pretrained_cold_s'][0]:.3f} | |"] if cpu.get("from_pretrained_cold_s") else []),
        f"| `TaskBank.open` (once) | {cpu['open_s']:.2f} | |",
        f"| `bank.model(task)` (once) | {cpu['model_s']:.2f} | |", "",
        f"Verdict, switch >= 10x faster than from_pretrained (warm page cache): {verdict(fp / sw >= 10)} "
        f"({fp / sw:.2f}x" + (f"; {cpu['from_pretrained_cold_s'][0] / sw:.2f}x against a load off the disk"
                              if cpu.get("from_pretrained_cold_s") else "") + "). "
        f"Logits of the switched model equal those of the exported checkpoint: "
        f"{verdict(cpu['logits_equal_export'])}.", "",
    ]
    if res.get("cuda"):
        cu = res["cuda"]
        csw, cfp = statistics.median(cu["switch_s"]), statistics.median(cu["from_pretrained_s"])
        lines += ["## CUDA", "", f"switch {csw:.4f} s, from_pretrained {cfp:.3f} s ({cfp / csw:.1f}x); "
                  f"GPU memory allocated {cu['cuda_allocated'] / GB:.3f} GB; logits equal export: "
                  f"{cu['logits_equal_export']}.", ""]
    else:
        lines += ["## CUDA", "", "Not measured: no CUDA device on this machine (tests/test_bank.py has the "
                  "CUDA bit-identity test, skipped without one).", ""]
    lines += ["## Storage (run.json)", "", "```", res["storage_text"].rstrip(), "```", "",
              f"Command: `{res['command']}`", ""]
    (out / "bank.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench_data")
    ap.add_argument("--out", type=Path, default=REPO / "bench")
    ap.add_argument("--repeats", type=int, default=3, help="switch cycles over the tasks / from_pretrained loads")
    ap.add_argument("--keep", action="store_true", help="keep the run and the exports")
    ap.add_argument("--reuse", action="store_true", help="reuse a complete run and exports kept by --keep")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
        if args.child == "bank":
            res = measure_bank(Path(args.rest[0]), Path(args.rest[1]), args.rest[2], int(args.rest[3]))
        else:
            res = measure_separate(Path(args.rest[0]), args.rest[1].split(","))
        print(json.dumps(res))
        return 0

    import torch

    from pipeline.export import export_tasks
    from pipeline.storage import format_storage
    man = ensure_models(args.data)
    exports = args.data / "bank_exports"
    prev = json.loads((args.out / "bank.json").read_text()) if (args.out / "bank.json").exists() else {}
    if args.reuse and (args.data / "bank_run" / "run.json").exists() and exports.is_dir():
        run, merge_s, export_s = args.data / "bank_run", prev.get("merge_s"), prev.get("export_all_s")
        written = {p.name: p for p in sorted(exports.iterdir())}
    else:
        run, merge_s = merge_run(man, args.data)
        if exports.exists():
            shutil.rmtree(exports)
        t = time.time()
        written = export_tasks(run, exports)
        export_s = time.time() - t
    res = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} "
                   f"GiB RAM, {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}",
        "threads": int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)),
        "merge_s": merge_s, "export_all_s": export_s,
        "command": "python3 scripts/bench_bank.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    res["cpu"] = _child("bank", [str(run), str(exports), "cpu", str(args.repeats)])
    res["separate"] = _child("separate", [str(exports), ",".join(written)])
    if torch.cuda.is_available():
        res["cuda"] = _child("bank", [str(run), str(exports), "cuda", str(args.repeats)])
    res["storage_text"] = format_storage(res["cpu"]["storage"])
    write_report(res, args.out)
    print((args.out / "bank.md").read_text())
    if not args.keep:
        shutil.rmtree(exports)
        shutil.rmtree(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
