"""The reduce: combine the jobs' small rows, finish the metadata, and move the finished outputs into place.

It never reads tensor data: shard bytes were written in place by the jobs. It runs in two idempotent
steps so that a crash anywhere inside it is repaired by running it again:
1. prepare (everything written inside `.tadrop/`, then a marker file);
2. publish (rename `*.partial` to `merged/`, `unified/`, `masks.zarr/`).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tadrop import methods

from .checkpoints import Checkpoint
from .config import MergeConfig
from .faults import crash_point
from .integrity import read_json
from .hfconfig import copy_non_weight_files
from .modelcard import write_model_card
from .plan import Plan
from .storage import storage_accounting
from .writers import MaskStore, atomic_write_json, fsync_dir, write_index, write_stats

log = logging.getLogger("tadrop")

PUBLISHED = (("merged.partial", "merged"), ("unified.partial", "unified"), ("masks.zarr.partial", "masks.zarr"))


def collect_rows(plan: Plan, results: dict) -> list[dict]:
    rows = []
    for name in sorted(plan.merge):
        rows.extend(results[f"merge:{name}"]["stats"])
    return rows


def task_scalars(plan: Plan, cfg: MergeConfig, results: dict) -> tuple[dict, list[str]]:
    """Per-task scalars stored with the masks: EMR rescalers, TALL lambdas."""
    spec = plan.spec
    scalars: dict = {}
    warnings: list[str] = []
    if spec.method == "emr":
        parts = [methods.EMRPartials.from_dict(results[f"merge:{n}"]["emr"]) for n in sorted(plan.merge)]
        lambdas, warnings = methods.emr_rescalers(parts, spec.emr_rescaler, task_names=spec.task_names)
        scalars["emr_lambdas"] = dict(zip(spec.task_names, map(float, lambdas)))
        scalars["emr_rescaler"] = spec.emr_rescaler
        if spec.emr_mask_mode:   # Phi's per-tensor rescale factor per task; export/bank: lambda_k * factor
            scalars["emr_tadrop"] = spec.emr_tadrop
            scalars["emr_tensor_scales"] = {n: [float(x) for x in results[f"merge:{n}"]["emr_scales"]]
                                            for n in sorted(plan.merge)}
    if spec.method in ("tall_masks", "consensus"):
        scalars["tall_lambdas"] = dict(zip(spec.task_names, map(float, spec.tall_lambdas)))
        scalars["tall_inner"] = spec.tall_inner if spec.method == "tall_masks" else spec.consensus_inner
    if spec.method == "consensus":
        scalars["consensus_k_min"] = spec.consensus_k_min
        scalars["consensus_alpha"] = spec.consensus_alpha
    return scalars, warnings


def reduce_run(out_dir: Path, state: Path, plan: Plan, cfg: MergeConfig, base: Checkpoint,
               results: dict, models: list) -> None:
    """`models` are the opened inputs (checkpoints or adapters) in task order."""
    marker = state / "reduce.json"
    if not marker.exists():
        scalars, warnings = task_scalars(plan, cfg, results)
        for w in warnings:
            log.warning(w)
        write_stats(collect_rows(plan, results), out_dir / "stats.parquet",
                    task_order=list(plan.spec.task_names))
        if plan.write_masks:
            store = MaskStore.open(state / "masks.zarr.partial")
            store.set_attrs({"tasks": list(plan.spec.task_names), "method": plan.spec.method,
                             "sparsify": cfg.to_json().get("sparsify"), **scalars})
        if plan.merged_plan:
            d = state / "merged.partial"
            write_index(plan.merged_plan, d)
            copy_non_weight_files(base, d, plan.merged_plan)
            if plan.vocab is not None:   # an extended vocabulary: its tokenizer and vocab_size
                plan.vocab.write_files(d)
            write_model_card(d, cfg, collect_rows(plan, results), scalars)
            fsync_dir(d)
        if plan.unified_plan:
            write_index(plan.unified_plan, state / "unified.partial")
            fsync_dir(state / "unified.partial")
        counts = {n: results[f"merge:{n}"].get("mask_counts") for n in sorted(plan.merge)}
        storage = storage_accounting(
            base, models, method=plan.spec.method,
            counts=counts if plan.write_masks and all(c is not None for c in counts.values()) else None,
            unified=state / "unified.partial" if plan.unified_plan else None,
            masks=state / "masks.zarr.partial" if plan.write_masks else None,
            merged=state / "merged.partial" if plan.merged_plan else None)
        atomic_write_json(marker, {"scalars": scalars, "warnings": warnings, "storage": storage})
    crash_point("reduce_prepared")
    if plan.write_masks and (state / "masks.zarr.partial").exists():
        MaskStore.sweep_temps(state / "masks.zarr.partial")   # left by workers killed mid-chunk

    for src_name, dst_name in PUBLISHED:
        src, dst = state / src_name, out_dir / dst_name
        if src.exists():
            if dst.exists():  # a stale copy of ours from an interrupted publish: the partial is newer
                shutil.rmtree(dst)
            src.rename(dst)
            crash_point("reduce_publish")
    fsync_dir(out_dir)
    record = read_json(marker, " (reduce marker)")
    if record.get("scalars"):
        log.info("per-task scalars: %s", json.dumps(record["scalars"]))
    if record.get("storage"):   # storage accounting (pipeline/storage.py) into run.json
        run = json.loads((out_dir / "run.json").read_text())
        atomic_write_json(out_dir / "run.json", {**run, "storage": record["storage"]})
