"""Files of the model-scope statistics: per-task radix histograms and the per-task values they give.

Model scope (one TADrop drop rate, or one top-k threshold, per task over the whole model) needs two
histogram passes over every tensor before the merge. Each job writes its tensor's histograms to its
own file; the driver merges them between passes. Counts are integers, so merging is exact and the
order of jobs cannot change the result.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tadrop import AbsSelector

from .writers import atomic_write_bytes

SELECTED_FILE = "selected.npz"   # the merged pass-1 histograms, read by pass-2 jobs
VALUES_FILE = "values.npz"       # per task: the model-wide drop rate (TADrop) or threshold (top-k)
EXTRA_FILE = "extra_ranks.npz"   # global_threshold: per task, ranks a further lo pass must resolve
MAJORITY_FILE = "majority.npz"   # inner ties_official: the model-wide majority sign


def _save(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_selectors(path: Path, sels: list[AbsSelector]) -> None:
    _save(path, {f"{i}/{key}": arr for i, s in enumerate(sels) for key, arr in s.to_numpy().items()})


def load_selectors(path: Path, k: int) -> list[AbsSelector]:
    with np.load(path, allow_pickle=False) as z:
        g = {key: z[key] for key in z.files}
    return [AbsSelector.from_numpy({key.split("/", 1)[1]: arr for key, arr in g.items()
                                    if key.startswith(f"{i}/")}) for i in range(k)]


def merge_selector_files(paths: list[Path], k: int) -> list[AbsSelector]:
    total: list[AbsSelector] | None = None
    for p in paths:
        part = load_selectors(p, k)
        if total is None:
            total = part
        else:
            for t, q in zip(total, part):
                t.merge(q)
    if total is None:
        raise ValueError("model scope: no tensor statistics to merge")
    return total


def save_values(path: Path, values: list[float]) -> None:
    _save(path, {"values": np.asarray(values, dtype=np.float64)})


def load_values(path: Path) -> list:
    """Per task a float, or a tuple of floats (global_threshold: (d, threshold))."""
    with np.load(path, allow_pickle=False) as z:
        return [tuple(map(float, v)) if np.ndim(v) else float(v) for v in z["values"]]


def save_majority(path: Path, majority: float) -> None:
    _save(path, {"majority": np.asarray([majority], dtype=np.float64)})


def load_majority(path: Path) -> float:
    with np.load(path, allow_pickle=False) as z:
        return float(z["majority"][0])


def save_ranks(path: Path, ranks: list[list[int]]) -> None:
    _save(path, {f"t{k}": np.asarray(r, dtype=np.int64) for k, r in enumerate(ranks)})


def load_ranks(path: Path, k: int) -> list[list[int]]:
    with np.load(path, allow_pickle=False) as z:
        return [[int(r) for r in z[f"t{i}"]] for i in range(k)]


def job_file(global_dir: Path, phase: str, tensor: str) -> Path:
    """Where a pass-`phase` job of `tensor` writes its histograms (tensor names may hold '/')."""
    return global_dir / phase / (tensor.replace("%", "%25").replace("/", "%2F") + ".npz")
