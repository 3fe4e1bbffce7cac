"""Toy scoring functions for `tadrop tune` tests: deterministic numbers from a loaded model.

`score` rewards a task whose model differs from the base (TADROP_TUNE_BASE, a safetensors HF dir) in
a target fraction of the entries of one weight: task0 wants most entries changed (a small lambda),
task1 none (the largest lambda), other tasks half, so the tasks choose different lambdas.
`flaky` is `score` that fails once after TADROP_TUNE_FAIL_AFTER calls (counted in TADROP_TUNE_COUNT).
"""
from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file

WEIGHT = "model.layers.0.mlp.up_proj.weight"
TARGET = {"task0": 0.9, "task1": 0.0}


def score(task: str, model) -> float:
    base = load_file(str(Path(os.environ["TADROP_TUNE_BASE"]) / "model.safetensors"))[WEIGHT]
    w = dict(model.named_parameters())[WEIGHT].detach()
    changed = float((w != base.to(w.dtype)).float().mean())
    return -abs(changed - TARGET.get(task, 0.5))


def flaky(task: str, model) -> float:
    counter = Path(os.environ["TADROP_TUNE_COUNT"])
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    if n + 1 == int(os.environ.get("TADROP_TUNE_FAIL_AFTER", "-1")):
        raise RuntimeError("scorer crashed (test)")
    return score(task, model)
