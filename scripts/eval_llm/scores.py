"""Held-out per-sequence losses of every scored model, cached on disk, and the
benchmark's headline number: the share of the base-to-fine-tune loss gap a
merge keeps.

Per-sequence (not per-domain) losses are kept so that results.py can run a
paired bootstrap over test sequences.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class Scores:
    """{label: {split: {domain: [loss of each sequence]}}}, saved after every new entry."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, label: str, split: str, domain: str) -> list[float] | None:
        return self.data.get(label, {}).get(split, {}).get(domain)

    def put(self, label: str, split: str, domain: str, losses: list[float]) -> None:
        self.data.setdefault(label, {}).setdefault(split, {})[domain] = [round(x, 6) for x in losses]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, sort_keys=True))
        os.replace(tmp, self.path)

    def has(self, label: str, split: str, domains: list[str]) -> bool:
        return all(self.get(label, split, d) is not None for d in domains)

    def mean_loss(self, label: str, split: str, domain: str) -> float:
        return float(np.mean(self.get(label, split, domain)))


def kept_share(base: float, individual: float, merged: float) -> float:
    """(L_base - L_merged) / (L_base - L_individual): 1 when the merge is as good
    on the domain as that domain's own fine-tune, 0 when it is no better than the
    base, negative when worse. The gap must be positive (the fine-tune helped)."""
    gap = base - individual
    if not gap > 0:
        raise ValueError(f"fine-tune did not lower the held-out loss (base {base:.4f}, "
                         f"fine-tune {individual:.4f}): its gap cannot normalise a merge")
    return (base - merged) / gap


def mean_share(scores: Scores, label: str, base: str, individual: str, split: str,
               domains: list[str]) -> dict[str, float]:
    """Per-domain kept share of `label`, plus the mean over domains under 'mean'."""
    out = {d: kept_share(scores.mean_loss(base, split, d), scores.mean_loss(individual, split, d),
                         scores.mean_loss(label, split, d)) for d in domains}
    out["mean"] = float(np.mean([out[d] for d in domains]))
    return out


def paired_bootstrap(base: list[np.ndarray], ind: list[np.ndarray], a: list[np.ndarray],
                     b: list[np.ndarray], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean-over-domains kept-share difference a - b with a 95% CI: the test
    sequences of each domain are resampled, the same draw for the base, the
    fine-tune and both merges (so the normalising gap is resampled too)."""
    rng = np.random.default_rng(seed)
    n_dom = len(base)
    boots = np.zeros(n_boot)
    point = []
    for lb, li, la, lb2 in zip(base, ind, a, b):
        gap = lb.mean() - li.mean()
        point.append(((lb.mean() - la.mean()) - (lb.mean() - lb2.mean())) / gap)
        idx = rng.integers(0, len(lb), size=(n_boot, len(lb)))
        g = lb[idx].mean(1) - li[idx].mean(1)
        boots += (lb2[idx].mean(1) - la[idx].mean(1)) / g
    boots /= n_dom
    return {"diff": float(np.mean(point)), "lo": float(np.quantile(boots, 0.025)),
            "hi": float(np.quantile(boots, 0.975)),
            "domains_up": int(sum(p > 0 for p in point)), "domains_down": int(sum(p < 0 for p in point))}
