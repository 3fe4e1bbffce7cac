#!/usr/bin/env python3
"""Adapter row of the merge benchmark (`bench_merge.py --adapters`): K = 16 rank-16 LoRA adapters on
every linear layer of the 1.08 GB LLaMA-shaped base, merged with EMR + TADrop.

Judged against the K = 16 full fine-tune EMR + TADrop row of bench/merge.json (same base, method,
workers and budget): no slower; bytes read from disk (the process tree's /proc/PID/io read_bytes,
from a dropped page cache) at most base + adapters + 5 %; peak RSS within workers x budget + 0.5 GiB.
Results: bench/merge-adapters.json and .md.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import bench_merge as bm

sys.path.insert(1, str(bm.REPO))

RANK, ALPHA, K = 16, 32, 16
MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def make_adapters(base: Path, out: Path, k: int, seed: int) -> dict[str, Path]:
    """k PEFT-layout LoRA adapters (bf16 A and B, nonzero) on every linear layer of the base."""
    from pipeline.checkpoints import Checkpoint
    shapes = {n: i.shape for n, i in Checkpoint.open(base, "base").tensors.items()}
    paths = {}
    for t in range(k):
        d = out / f"lora{t:02d}"
        paths[f"lora{t:02d}"] = d
        if (d / "adapter_model.safetensors").exists():
            continue
        g = torch.Generator().manual_seed(seed * 1000 + t)
        sd, targets = {}, set()
        for name, shape in shapes.items():
            parts = name.split(".")
            if len(parts) < 5 or parts[-1] != "weight" or parts[-2] not in MODULES.get(parts[-3], ()):
                continue
            module = name[: -len(".weight")]
            targets.add(parts[-2])
            out_f, in_f = shape
            sd[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(RANK, in_f, generator=g) / in_f ** 0.5).bfloat16()
            sd[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_f, RANK, generator=g) * 1e-3).bfloat16()
        tmp = out / f".lora{t:02d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(sd, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(targets),
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "bias": "none",
            "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}, indent=2))
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    return paths


def _dir_bytes(d: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in d.glob(pattern))


def main(args) -> int:
    data = args.data.resolve()
    man = bm.ensure_data(data, 0, args.seed)
    base = Path(man["base"]).resolve()
    adapters = make_adapters(base, data / "adapters", K, args.seed)
    run_dir, cfg, log = data / "runs" / "tadrop-emr_tadrop-lora16", data / "configs" / "lora16.yaml", \
        data / "logs" / "tadrop-emr_tadrop-lora16.log"
    for d in (run_dir.parent, cfg.parent, log.parent):
        d.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    lines = [f"base: {base}", "models:"] + [f"  - {{name: {n}, adapter: {p}}}" for n, p in adapters.items()]
    lines += ["method: emr", "sparsify: {kind: tadrop, a: 0.5, b: 0.95, rescale: norm, scope: tensor}",
              f"output: {run_dir}", "output_dtype: bfloat16", "shard_size: 5GB", "seed: 0"]
    cfg.write_text("\n".join(lines) + "\n")
    cmd = bm.tadrop_cmd(args) + ["merge", str(cfg), "--workers", str(args.workers),
                                 "--memory-budget", args.memory_budget, "--quiet"]
    busy = bm.wait_idle(args.wait_idle) if args.wait_idle > 0 else -1.0
    if bm.drop_caches():
        bm.load_software("tadrop")      # inputs cold, the tool's own code (torch: ~0.4 GB) warm
        cache = "cold (page cache dropped, then the tool's code loaded: inputs cold, software warm)"
    else:
        cache = "warm (could not drop the page cache)"
    print(f"[lora16] machine {busy:.0%} busy before, {cache}; running ...", flush=True)
    # bm.run_measured counts reads as bench_merge does: this process's own /proc/self/io delta, which the
    # kernel credits with every reaped child's I/O. (Summing each live process's counter, as this script
    # did, counted the workers twice: the driver's counter takes in its workers' reads when it reaps them.)
    m = bm.run_measured(cmd, log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    inputs = _dir_bytes(base, "*.safetensors") + sum(_dir_bytes(p, "*.safetensors") for p in adapters.values())
    full = next((r for r in json.loads((args.out / "merge.json").read_text())["results"]
                 if r["case"] == "tadrop-emr_tadrop-k16"), None)
    rss_target = args.workers * bm.parse_gib(args.memory_budget) + 0.5
    row = {
        "case": "tadrop-emr_tadrop-lora16", "k": K, "rank": RANK, "rc": m["rc"], "wall_s": round(m["wall_s"], 2),
        "peak_rss_gib": round(m["rss"] / bm.GiB, 3), "peak_anon_gib": round(m["anon"] / bm.GiB, 3),
        "read_gb": round(m["read_bytes"] / 1e9, 3), "inputs_gb": round(inputs / 1e9, 3),
        "tree_cpu_s": round(m["tree_cpu_s"], 1), "others_cpu_share": round(m["others_cpu_share"], 3),
        "busy_before": busy, "cache": cache, "rss_target_gib": rss_target,
        "full_k16_wall_s": full["wall_s"] if full else None, "full_k16_rss_gib": full["peak_rss_gib"] if full else None,
    }
    row["meets_read"] = m["rc"] == 0 and m["read_bytes"] <= 1.05 * inputs
    row["meets_rss"] = m["rc"] == 0 and row["peak_rss_gib"] <= rss_target
    row["meets_wall"] = (m["rc"] == 0 and full is not None and row["wall_s"] <= full["wall_s"])
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": bm.machine(), "workers": args.workers, "memory_budget": args.memory_budget,
            "base_gb": round(_dir_bytes(base, "*.safetensors") / 1e9, 3),
            "full_k16_from": "bench/merge.json row tadrop-emr_tadrop-k16" + (f" ({json.loads((args.out / 'merge.json').read_text())['meta']['date']})" if full else " (absent)")}
    (args.out / "merge-adapters.json").write_text(json.dumps({"meta": meta, "results": [row]}, indent=2) + "\n")
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    md = ["# Merge benchmark: LoRA adapters as fine-tunes", "",
          f"{meta['date']} on {meta['machine']}. Base: the LLaMA-shaped bf16 checkpoint of bench/merge.md "
          f"({meta['base_gb']} GB); {K} PEFT-layout LoRA adapters, rank {RANK}, alpha {ALPHA}, bf16, on every "
          "linear layer (q, k, v, o, gate, up, down of all 8 layers); EMR + TADrop; "
          f"`--workers {args.workers} --memory-budget {args.memory_budget}`. Page cache: {cache}.", "",
          "| case | K | wall s | full K=16 wall s | no slower | read GB | base + adapters GB | read <= +5% | "
          "peak RSS GiB | peak anon GiB | RSS target GiB | meets RSS | CPU s | others' CPU |",
          "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |",
          f"| {row['case']} | {K} | {row['wall_s']} | {row['full_k16_wall_s']} | {yes(row['meets_wall'])} | "
          f"{row['read_gb']} | {row['inputs_gb']} | {yes(row['meets_read'])} | {row['peak_rss_gib']} | "
          f"{row['peak_anon_gib']} | {rss_target} | {yes(row['meets_rss'])} | {row['tree_cpu_s']} | "
          f"{row['others_cpu_share']:.0%} |", "",
          f"The full fine-tune figures are from {meta['full_k16_from']}: the same method on 16 full "
          "1.08 GB fine-tunes. Bytes read: what the merge's process tree read from storage "
          "(/proc/self/io read_bytes, mmap page faults included) after the page cache was dropped, "
          "read as this benchmark's own counter, which the kernel credits with its reaped children's I/O "
          "(the previous round summed every process's counter and so counted the workers' reads twice). "
          "Others' CPU: the share of the machine's cores other people's jobs used meanwhile (a shared "
          "2-core machine): wall times under contention are upper bounds.", "",
          f"Command: `python3 scripts/bench_merge.py --adapters`"]
    (args.out / "merge-adapters.md").write_text("\n".join(md) + "\n")
    print(f"[lora16] rc={m['rc']} {row['wall_s']} s, read {row['read_gb']} GB of {row['inputs_gb']} GB inputs, "
          f"peak RSS {row['peak_rss_gib']} GiB; wrote {args.out / 'merge-adapters.md'}", flush=True)
    if not args.keep_outputs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if m["rc"] == 0 else 1
