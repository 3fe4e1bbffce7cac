"""Scores an encoder checkpoint on task splits, with a resumable score cache.

A merged model is scored on every task; a per-task model (individual
fine-tune, EMR / TALL export) on its own task only. Scores land in
WORK/scores.json as they come, so a re-run of the benchmark skips them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import encoder


class Scores:
    """{label: {split: {task: accuracy}}} persisted after every new score."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, label: str, split: str, task: str) -> float | None:
        return self.data.get(label, {}).get(split, {}).get(task)

    def put(self, label: str, split: str, task: str, acc: float) -> None:
        self.data.setdefault(label, {}).setdefault(split, {})[task] = acc
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def has(self, label: str, split: str, tasks: list[str]) -> bool:
        return all(self.get(label, split, t) is not None for t in tasks)

    def drop(self, label: str) -> None:
        if self.data.pop(label, None) is not None:
            self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))


def load_checked(path: Path):
    """AutoModel.from_pretrained, refusing a checkpoint that silently misses weights
    (transformers would initialise them at random and we would score noise)."""
    from transformers import AutoModel, logging
    logging.set_verbosity_error()
    model, info = AutoModel.from_pretrained(str(path), output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        raise RuntimeError(f"{path}: checkpoint misses {missing[:5]} / mismatched "
                           f"{info.get('mismatched_keys')[:5] if info.get('mismatched_keys') else []}")
    return model.float().eval()


def score_model(path: Path | None, tasks: dict[str, dict], split: str, label: str,
                scores: Scores) -> dict[str, float]:
    """Accuracy of one checkpoint (None: the base) on each given task; cached."""
    todo = [t for t in tasks if scores.get(label, split, t) is None]
    if todo:
        model = encoder.load_model() if path is None else load_checked(path)
        with torch.inference_mode():
            for t in todo:
                scores.put(label, split, t, encoder.accuracy(model, tasks[t], split))
        del model
    return {t: scores.get(label, split, t) for t in tasks}
