"""The validation score `tadrop tune` calls for TALL's per-task lambda in this benchmark:
`tadrop tune RUN --score tune_score:val_accuracy` (scripts/eval on PYTHONPATH, the benchmark's
WORK directory in $TADROP_EVAL_WORK). Accuracy on the same fixed, class-balanced validation
subset the benchmark selects every other hyperparameter on."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import encoder

VAL_PER_CLASS = 24     # selection scores a fixed val subset: enough to rank lambdas, 2x faster


def val_subset(rows: list, per_class: int = VAL_PER_CLASS) -> list:
    """The first `per_class` validation examples of each class, in split order."""
    per: dict[int, int] = {}
    sub = []
    for text, y in rows:
        if per.get(y, 0) < per_class:
            per[y] = per.get(y, 0) + 1
            sub.append([text, y])
    return sub


def val_accuracy(task: str, model) -> float:
    t = encoder.load_task(Path(os.environ["TADROP_EVAL_WORK"]), task)
    t["splits"]["valsel"] = val_subset(t["splits"]["val"])
    with torch.inference_mode():
        c = encoder.correct(model.float().eval(), t, "valsel")
    return sum(c) / len(c)
