"""Storage accounting: what the run's compact form costs against K full checkpoints, and how the
tasks share parameters.

EMR and TALL store K task models as base + one shared vector + one bit per parameter per task (the
TALL paper: 57 GB of checkpoints down to 8.2 GB). This module measures that on disk, the density of
each task's mask, and the histogram of how many tasks keep each parameter, per tensor type: TALL's
"catastrophic" weights are kept by no task, its "selfish" ones by exactly one. The counts are
taken by the engine as it makes each job's masks, while they are in memory
(`TensorResult.mask_counts`), and summed at the reduce (`combine_counts`): reading K bits per
parameter back from disk would cost a pass over the whole mask store. Kept in run.json; `tadrop report` and the task bank show it. A run made before
this (no counts in its jobs' results) is measured from the store (`mask_statistics`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tadrop import _bools as B

from .checkpoints import Checkpoint
from .report import tensor_type
from .writers import MaskStore

READ_ELEMENTS = 1 << 24  # mask entries of one task per read (bounded memory)


def dir_bytes(path: Path | None) -> int:
    if path is None or not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_bytes(ckpt: Checkpoint) -> int:
    """Bytes of a checkpoint's weight files (its index and config files are not counted)."""
    return sum(f.stat().st_size for f in ckpt.files)


def mask_counts(masks: np.ndarray) -> dict:
    """One job's contribution from a (K, ...) boolean block of mask rows: per task the entries kept,
    and how many entries are kept by 0..K tasks (the engine counts them itself while the rows are
    in memory: `TensorResult.mask_counts`)."""
    kept, hist = B.mask_counts(masks)
    return {"kept": kept, "hist": hist, "numel": int(np.prod(masks.shape[1:], dtype=np.int64))}


def combine_counts(per_tensor: dict[str, dict], tasks: list[str]) -> dict:
    """The jobs' counts (tensor name -> mask_counts summed over its rows) as `mask_statistics` gives them."""
    k = len(tasks)
    kept = np.zeros(k, dtype=np.int64)
    hist: dict[str, np.ndarray] = {}
    total = 0
    for name, c in per_tensor.items():
        kept += np.asarray(c["kept"], dtype=np.int64)
        h = hist.setdefault(tensor_type(name), np.zeros(k + 1, dtype=np.int64))
        h += np.asarray(c["hist"], dtype=np.int64)
        total += int(c["numel"])
    return {
        "masked_params": total,
        "mask_density": {t: float(kept[i] / total) if total else 0.0 for i, t in enumerate(tasks)},
        "keep_histogram": {t: v.tolist() for t, v in sorted(hist.items())},
    }


def mask_statistics(store: MaskStore, tasks: list[str]) -> dict:
    """Per-task mask density and, per tensor type, how many parameters are kept by 0..K tasks."""
    k = len(tasks)
    kept = np.zeros(k, dtype=np.int64)
    hist: dict[str, np.ndarray] = {}
    total = 0
    for name in store.names():
        arr = store._array(name)
        shape = arr.shape[1:]
        rows = shape[0] if shape else 1
        row_numel = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        step = max(1, READ_ELEMENTS // max(1, row_numel))
        h = hist.setdefault(tensor_type(name), np.zeros(k + 1, dtype=np.int64))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            count = None
            for i in range(k):
                m = store.read(name, i, r0, r1) if shape else store.read(name, i)
                m = np.asarray(m, dtype=bool).reshape(-1)
                kept[i] += int(np.count_nonzero(m))
                count = m.astype(np.uint16) if count is None else count + m
            h += np.bincount(count, minlength=k + 1)[: k + 1]
            total += count.size
    return {
        "masked_params": total,
        "mask_density": {t: float(kept[i] / total) if total else 0.0 for i, t in enumerate(tasks)},
        "keep_histogram": {t: v.tolist() for t, v in sorted(hist.items())},
    }


def storage_accounting(base: Checkpoint, models: list[Checkpoint], *, unified: Path | None = None,
                       masks: Path | None = None, merged: Path | None = None, method: str,
                       counts: dict[str, dict] | None = None) -> dict:
    """The run's storage record (run.json `storage`). Paths are the run's output directories
    (or their partial names during the reduce: the bytes are the same once renamed). `counts`:
    the jobs' mask counts per tensor; without them the mask store is read back."""
    k = len(models)
    rec = {
        "method": method, "tasks": k,
        "checkpoints_bytes": sum(weight_bytes(m) for m in models),
        "base_bytes": weight_bytes(base),
        "unified_bytes": dir_bytes(unified),
        "masks_bytes": dir_bytes(masks),
        "merged_bytes": dir_bytes(merged),
    }
    if merged is not None and dir_bytes(merged):   # one model serves: its own checkpoint
        rec["compact"] = "merged"
        rec["compact_bytes"] = rec["merged_bytes"]
    else:
        rec["compact"] = "base + unified + masks"
        rec["compact_bytes"] = rec["base_bytes"] + rec["unified_bytes"] + rec["masks_bytes"]
    rec["ratio"] = rec["checkpoints_bytes"] / rec["compact_bytes"] if rec["compact_bytes"] else None
    if masks is not None and Path(masks).is_dir():
        tasks = [m.name for m in models]
        if counts is not None:
            rec.update(combine_counts(counts, tasks))
        else:
            rec.update(mask_statistics(MaskStore.open(masks, mode="r"), tasks))
        rec["bits_per_mask_entry"] = 8 * rec["masks_bytes"] / max(1, rec["masked_params"] * k)
    return rec


def run_storage(run_dir: Path, record: dict) -> dict:
    """The same record for a finished run directory (for runs made before the reduce wrote it)."""
    run_dir = Path(run_dir)
    from .config import MergeConfig
    from .sources import open_inputs
    cfg = MergeConfig.from_json(record["config"])
    base, models = open_inputs(cfg)   # checkpoints, adapters and repo ids alike
    return storage_accounting(base, models, unified=run_dir / "unified", masks=run_dir / "masks.zarr",
                              merged=run_dir / "merged", method=cfg.method)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def format_storage(rec: dict) -> str:
    """The storage table `tadrop report` prints and `TaskBank.storage_report()` returns."""
    k = rec["tasks"]
    lines = ["storage:",
             f"  {k} full checkpoints{'':<14} {_gb(rec['checkpoints_bytes']):>12}",
             f"  {rec['compact']:<30} {_gb(rec['compact_bytes']):>12}"
             + (f"  (base {_gb(rec['base_bytes'])}, unified {_gb(rec['unified_bytes'])}, "
                f"masks {_gb(rec['masks_bytes'])})" if rec["compact"] != "merged" else ""),
             f"  ratio{'':<26} {rec['ratio']:>11.2f}x" if rec.get("ratio") else "  ratio: -"]
    if "mask_density" in rec:
        lines.append(f"  masks: {rec['bits_per_mask_entry']:.3f} bits per (parameter, task) on disk")
        lines += ["", "mask density per task (fraction of its masked parameters kept):"]
        lines += [f"  {t:<18} {d:.4f}" for t, d in rec["mask_density"].items()]
        lines += ["", "parameters by the number of tasks keeping them (fraction of the type's parameters;",
                  "0 = kept by none: TALL's catastrophic weights, 1 = by exactly one: selfish):"]
        head = "".join(f"{c:>8}" for c in range(k + 1))
        lines.append(f"  {'type':<18} {'params':>12}{head}")
        hist = rec["keep_histogram"]
        total = np.zeros(k + 1, dtype=np.int64)
        for t, counts in hist.items():
            n = sum(counts)
            total += counts
            lines.append(f"  {t:<18} {n:>12,}" + "".join(f"{c / max(1, n):>8.4f}" for c in counts))
        n = int(total.sum())
        lines.append(f"  {'all':<18} {n:>12,}" + "".join(f"{c / max(1, n):>8.4f}" for c in total))
    return "\n".join(lines) + "\n"
