"""A Hugging Face model card (README.md) for every checkpoint we write: merged/ and each export.

Front matter the Hub reads (base_model with the models merged, base_model_relation: merge, tags
[merge, tadrop-merge]); then the method and its parameters, where TADrop dropped (per task), and the
config + command that reproduce it.  Opt out with `model_card: false`.  Nothing in it depends on
where the run directory is, so two runs of one config keep identical bytes.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable

import yaml

from .config import MergeConfig
from .writers import atomic_write_bytes

_SECTIONS = {"emr": ("emr",), "tall_masks": ("tall",), "consensus": ("tall", "consensus")}


def _drop_summary(rows: Iterable[dict], tasks: list[str]) -> list[str]:
    """Per task: numel-weighted mean drop rate, min-max over tensors, fraction kept, mask density."""
    acc = defaultdict(lambda: {"n": 0, "drop": 0.0, "kept": 0, "mask": 0.0, "rates": [], "has_kept": True,
                               "has_mask": True})
    for r in rows:
        a = acc[r["task"]]
        n = int(r["numel"] or 0)
        a["n"] += n
        if r.get("drop_rate") is not None:
            a["drop"] += float(r["drop_rate"]) * n
            a["rates"].append(float(r["drop_rate"]))
        if r.get("kept") is None:
            a["has_kept"] = False
        else:
            a["kept"] += int(r["kept"])
        if r.get("mask_density") is None:
            a["has_mask"] = False
        else:
            a["mask"] += float(r["mask_density"]) * n
    if not any(acc[t]["rates"] for t in tasks):
        return ["No per-tensor drop rates: this method's sparsifier drops nothing (`sparsify: none`)."]
    lines = ["| task | mean drop rate | per-tensor range | kept | mask density |", "| --- | ---: | ---: | ---: | ---: |"]
    for t in tasks:
        a = acc[t]
        n = max(a["n"], 1)
        rng = f"{min(a['rates']):.3f}-{max(a['rates']):.3f}" if a["rates"] else "-"
        kept = f"{a['kept'] / n:.3f}" if a["has_kept"] and a["n"] else "-"
        mask = f"{a['mask'] / n:.3f}" if a["has_mask"] and a["n"] else "-"
        drop = f"{a['drop'] / n:.3f}" if a["rates"] else "-"
        lines.append(f"| {t} | {drop} | {rng} | {kept} | {mask} |")
    lines.append("")
    lines.append("Mean drop rate weighted by tensor size; `tadrop report RUN` draws the per-tensor heatmap.")
    return lines


def _config_yaml(cfg: MergeConfig) -> str:
    d = cfg.to_json()
    keep = {"base", "models", "method", "sparsify", "lambda", "passthrough", "output_dtype",
            "unified_dtype", "shard_size", "seed", *_SECTIONS.get(cfg.method, ())}
    d = {k: v for k, v in d.items() if k in keep}
    if cfg.method not in ("task_arithmetic", "ties"):
        d.pop("lambda", None)
    for m in d["models"]:
        if m.get("sparsify") is None:
            m.pop("sparsify", None)
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)


def card_text(cfg: MergeConfig, rows: Iterable[dict], scalars: dict | None = None,
              task: str | None = None, run_dir: Path | None = None) -> str:
    names = cfg.task_names
    front = {"base_model": [str(cfg.base), *[str(m.path) for m in cfg.models]],
             "base_model_relation": "merge", "library_name": "transformers",
             "tags": ["merge", "tadrop-merge", cfg.method.replace("_", "-")]}
    what = (f"Task **{task}**'s model from the {cfg.method} merge" if task else f"The {cfg.method} merge")
    sp = cfg.sparsify.model_dump()
    out = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
           f"# {task or 'merged'}", "",
           f"{what} of {len(names)} fine-tunes of `{cfg.base}`, made with "
           "tadrop-merge (out-of-core TADrop / TIES / EMR merging).", "",
           "## Models merged", "", f"- base: `{cfg.base}`"]
    for m in cfg.models:
        extra = f", sparsify {m.sparsify}" if m.sparsify else ""
        out.append(f"- {m.name}: `{m.path}` (weight {m.weight}{extra})")
    out += ["", "## Method", "", "| parameter | value |", "| --- | --- |", f"| method | {cfg.method} |",
            f"| sparsify | {', '.join(f'{k}={v}' for k, v in sp.items())} |"]
    if cfg.method in ("task_arithmetic", "ties"):
        out.append(f"| lambda | {cfg.lam} |")
    for sec in _SECTIONS.get(cfg.method, ()):
        for k, v in getattr(cfg, sec).model_dump().items():
            out.append(f"| {sec}.{k} | {v} |")
    out.append(f"| output dtype | {cfg.output_dtype or 'as the base'} |")
    if cfg.sparsify.kind == "dare":
        out.append(f"| seed | {cfg.seed} |")
    for k, v in (scalars or {}).items():
        if isinstance(v, dict):
            v = ", ".join(f"{t}: {x:.4g}" if isinstance(x, float) else f"{t}: {x}" for t, x in v.items())
        out.append(f"| {k} | {v} |")
    out += ["", "## Where the sparsifier dropped", "", *_drop_summary(rows, names), "",
            "## Reproduce", "", "```yaml", _config_yaml(cfg).rstrip(), "```", "", "```bash",
            "tadrop merge config.yaml RUN_DIR          # the config above"]
    if task:
        out.append(f"tadrop export RUN_DIR --task {task} --output {task}")
    out += ["```", ""]
    return "\n".join(out)


def write_model_card(dest: Path, cfg: MergeConfig, rows: Iterable[dict], scalars: dict | None = None,
                     task: str | None = None, run_dir: Path | None = None) -> None:
    """dest/README.md, unless the config opts out (`model_card: false`)."""
    if cfg.model_card:
        atomic_write_bytes(Path(dest) / "README.md",
                           card_text(cfg, rows, scalars, task, run_dir).encode())


def stats_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's stats.parquet (for an export's card)."""
    import pyarrow.parquet as pq
    p = Path(run_dir) / "stats.parquet"
    return pq.read_table(p).to_pylist() if p.exists() else []


def attrs_scalars(attrs: dict) -> dict:
    """The per-task scalars among masks.zarr's attributes."""
    return {k: v for k, v in attrs.items() if k not in ("tasks", "method", "sparsify")}
