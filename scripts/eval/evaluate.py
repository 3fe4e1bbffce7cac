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


PAIRED_SPLITS = ("test",)   # splits whose per-example correctness is kept (paired bootstrap)


class Scores:
    """{label: {split: {task: accuracy}}} persisted after every new score, plus
    per-example correctness ('0101...') of test scores in a sibling file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.bits_path = self.path.with_name(self.path.stem + "_examples.json")
        self.data: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.bits: dict = json.loads(self.bits_path.read_text()) if self.bits_path.exists() else {}

    def get(self, label: str, split: str, task: str) -> float | None:
        if split in PAIRED_SPLITS and self.examples(label, split, task) is None:
            return None
        return self.data.get(label, {}).get(split, {}).get(task)

    def examples(self, label: str, split: str, task: str) -> list[bool] | None:
        s = self.bits.get(label, {}).get(split, {}).get(task)
        return None if s is None else [c == "1" for c in s]

    def put(self, label: str, split: str, task: str, correct: list[bool]) -> None:
        self.data.setdefault(label, {}).setdefault(split, {})[task] = sum(correct) / len(correct)
        _save(self.path, self.data)
        if split in PAIRED_SPLITS:
            bits = "".join("1" if c else "0" for c in correct)
            self.bits.setdefault(label, {}).setdefault(split, {})[task] = bits
            _save(self.bits_path, self.bits)

    def has(self, label: str, split: str, tasks: list[str]) -> bool:
        return all(self.get(label, split, t) is not None for t in tasks)


def _save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


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
                scores.put(label, split, t, encoder.correct(model, tasks[t], split))
        del model
    return {t: scores.get(label, split, t) for t in tasks}
