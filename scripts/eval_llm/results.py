"""Writes the LLM benchmark's results: bench/eval_llm.json (everything),
bench/eval_llm.md (tables for people), bench/eval_llm.png (`tadrop report`'s
drop-rate heatmap of the long-fine-tune EMR + TADrop run), and the generated
block of docs/EVAL_LLM.md.

Every number is a kept share: (L_base - L_merge) / (L_base - L_fine-tune) of
held-out loss, per domain, then the mean over domains, in percent.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from merges import REPO, merge_seconds  # noqa: I001  (merges puts scripts/ on sys.path)
import eval_common  # noqa: E402
from scores import paired_bootstrap

LORA_INPUT = ("the PEFT adapter directories themselves (`models: - {name, adapter: DIR}`; the product "
              "reads each adapter as its task vector), not merged to full first")
SETTING_TITLE = {"full": "full fine-tunes", "lora": "LoRA adapters", "long": "long full fine-tunes"}
TABLE1 = [("ta", "Task arithmetic"), ("ta_tadrop", "TA + TADrop"),
          ("ties", "TIES"), ("ties_tadrop", "TIES + TADrop"),
          ("emr", "EMR"), ("emr_tadrop", "EMR + TADrop"),
          ("tall", "TALL masks"), ("tall_tadrop", "TALL masks + TADrop"),
          ("consensus", "Consensus (TA)"), ("consensus_tadrop", "Consensus (TA) + TADrop"),
          ("dare", "DARE (TA)")]
TABLE4 = [("emr", "EMR, no sparsifier"),
          ("emr_tadrop", "EMR + TADrop, rescaled (default), rescale norm"),
          ("emr_rescaled_none", "EMR + TADrop, rescaled, rescale none (w/o scale)"),
          ("emr_rescaled_inverse_keep", "EMR + TADrop, rescaled, rescale inverse_keep"),
          ("emr_mask_norm", "EMR + TADrop, mask, rescale norm"),
          ("emr_mask_none", "EMR + TADrop, mask, rescale none (w/o scale)"),
          ("emr_mask_inverse_keep", "EMR + TADrop, mask, rescale inverse_keep"),
          ("emr_scope_model", "EMR + TADrop, scope model (one uniform rate)"),
          ("emr_scope_global_threshold", "EMR + TADrop, scope global_threshold (one threshold)"),
          ("emr_topk", "EMR + fixed-rate top-k at TADrop's kept fraction")]
LONG = [k for k in TABLE1[:6]] + [("emr_mask_norm", "EMR + TADrop, mask"),
                                  ("emr_scope_global_threshold", "EMR + TADrop, scope global_threshold"),
                                  ("emr_topk", "EMR + fixed-rate top-k at TADrop's kept fraction")]
PAIRS = [("ta_tadrop", "ta", "TA + TADrop vs TA"),
         ("ties_tadrop", "ties", "TIES + TADrop vs TIES"),
         ("emr_tadrop", "emr", "EMR + TADrop vs EMR"),
         ("tall_tadrop", "tall", "TALL + TADrop vs TALL"),
         ("consensus_tadrop", "consensus", "Consensus + TADrop vs Consensus"),
         ("emr_mask_norm", "emr_tadrop", "EMR integration: mask vs rescaled (norm)"),
         ("emr_mask_norm", "emr", "EMR + TADrop (mask) vs EMR"),
         ("emr_rescaled_none", "emr_tadrop", "w/o scale vs norm (rescaled)"),
         ("emr_mask_none", "emr_mask_norm", "w/o scale vs norm (mask)"),
         ("emr_rescaled_inverse_keep", "emr_tadrop", "inverse_keep vs norm (rescaled)"),
         ("emr_mask_inverse_keep", "emr_mask_norm", "inverse_keep vs norm (mask)"),
         ("emr_scope_model", "emr_tadrop", "scope model vs tensor (EMR + TADrop)"),
         ("emr_scope_global_threshold", "emr_tadrop", "scope global_threshold vs tensor (EMR + TADrop)"),
         ("emr_scope_global_threshold", "emr_scope_model", "scope global_threshold vs model (EMR + TADrop)"),
         ("emr_topk", "emr_tadrop", "fixed-rate top-k vs TADrop (EMR, same kept fraction)"),
         ("emr_scope_model", "emr", "EMR + TADrop (scope model) vs EMR"),
         ("emr_scope_global_threshold", "emr", "EMR + TADrop (scope global_threshold) vs EMR"),
         ("emr_topk", "emr", "EMR + top-k at TADrop's fraction vs EMR")]


def _arrays(bench, label: str, domains: list[str]) -> list[np.ndarray]:
    return [np.asarray(bench.scores.get(label, "test", d), float) for d in domains]


def comparisons(bench, setting: str) -> dict[str, dict]:
    rows = bench.rows.get(setting, {})
    doms = bench.domains
    base, ind = _arrays(bench, "base", doms), _arrays(bench, f"{setting}/individual", doms)
    out = {}
    for ka, kb, title in PAIRS:
        if ka in rows and kb in rows:
            a = _arrays(bench, f"{setting}/{rows[ka][0]}", doms)
            b = _arrays(bench, f"{setting}/{rows[kb][0]}", doms)
            out[title] = paired_bootstrap(base, ind, a, b)
    return out


def row_cis(bench, setting: str) -> dict[str, dict]:
    """Each row's mean kept share with its own 95% bootstrap CI (vs the base, share 0)."""
    doms = bench.domains
    base, ind = _arrays(bench, "base", doms), _arrays(bench, f"{setting}/individual", doms)
    return {k: paired_bootstrap(base, ind, _arrays(bench, f"{setting}/{lab}", doms), base)
            for k, (lab, _) in bench.rows.get(setting, {}).items()}


def _hyper(bench, setting: str, key: str) -> str:
    c = bench.chosen.get(f"{setting}/{key}")
    if key in ("tall", "tall_tadrop") and c:
        return "lambda_k " + ", ".join(f"{d} {v}" for d, v in c["lambdas"].items())
    if key == "emr_topk" and c:
        return f"density {c['density']}"
    if c and "label" in c:
        name, _, v = c["label"].partition("@")
        what = "alpha" if key.startswith("consensus") else "lambda"
        extra = f"p {name.split('_p')[1]}, " if key == "dare" else ""
        return f"{extra}{what} {v}"
    return ""


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def ci(r: dict) -> str:
    return f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]"


def domain_table(bench, setting: str, rows: list[tuple[str, str]], test: dict, cis: dict) -> list[str]:
    doms = bench.domains
    out = ["| method | " + " | ".join(doms) + " | **mean** | 95% CI | chosen on val |",
           "| --- | " + " | ".join("---:" for _ in doms) + " | ---: | --- | --- |"]
    for key, title in rows:
        if key not in test:
            why = bench.not_run.get(f"{setting}/{key}")
            if why:
                out.append(f"| {title} | " + " | ".join("" for _ in doms) + f" | not run | | {why[:90]} |")
            continue
        s = test[key]
        out.append(f"| {title} | " + " | ".join(pct(s[d]) for d in doms)
                   + f" | **{pct(s['mean'])}** | {ci(cis[key])} | {_hyper(bench, setting, key)} |")
    return out


def spread(run: Path) -> dict | None:
    """min / median / max TADrop drop rate d per tensor type over (tensor, task) rows."""
    try:
        import pyarrow.parquet as pq
        sys.path.insert(0, str(REPO))
        from pipeline.report import tensor_type
        rs = [r for r in pq.read_table(run / "stats.parquet").to_pylist() if r["drop_rate"] is not None]
    except Exception:
        return None
    if not rs:
        return None
    by: dict[str, list[float]] = {}
    for r in rs:
        by.setdefault(tensor_type(r["tensor"]), []).append(r["drop_rate"])
    n = sum(r["numel"] for r in rs)
    return {"weighted": sum(r["drop_rate"] * r["numel"] for r in rs) / n,
            "types": {t: {"min": min(v), "median": statistics.median(v), "max": max(v), "n": len(v)}
                      for t, v in sorted(by.items())}}


def spread_table(sp: dict[str, dict]) -> list[str]:
    settings = [s for s in sp if sp[s]]
    types = sorted({t for s in settings for t in sp[s]["types"]})
    out = ["| tensor type | " + " | ".join(f"{SETTING_TITLE[s]}: min / median / max d" for s in settings) + " |",
           "| --- | " + " | ".join("---" for _ in settings) + " |"]
    for t in types:
        cells = []
        for s in settings:
            v = sp[s]["types"].get(t)
            cells.append(f"{v['min']:.2f} / {v['median']:.2f} / {v['max']:.2f}" if v else "")
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    out.append("| **all, parameter-weighted** | " + " | ".join(f"{sp[s]['weighted']:.3f}" for s in settings) + " |")
    return out


def write(out_dir: Path, bench, test: dict[str, dict], timings: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doms = bench.domains
    cis = {s: row_cis(bench, s) for s in test}
    comps = {s: comparisons(bench, s) for s in test}
    sp = {s: spread(bench.work / "runs" / f"{s}__emr_tadrop") for s in test}
    png = out_dir / "eval_llm.png"
    try:
        sys.path.insert(0, str(REPO))
        from pipeline.report import write_report
        write_report(bench.work / "runs" / "long__emr_tadrop", png)
    except Exception as e:   # the tables matter more than the picture
        print(f"report failed: {e}", file=sys.stderr)
    base_loss = {d: bench.scores.mean_loss("base", "test", d) for d in doms}
    ind_loss = {s: {d: bench.scores.mean_loss(f"{s}/individual", "test", d) for d in doms} for s in test}
    info = json.loads((bench.base / "train.json").read_text())
    record = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.python_version()}, torch {__import__('torch').__version__}",
        "size": bench.size, "parameters": info.get("parameters"),
        "recipes": {k: vars(v) if not hasattr(v, "__dataclass_fields__") else
                    {f: getattr(v, f) for f in v.__dataclass_fields__} for k, v in bench.recipes.items()},
        "lora_input": LORA_INPUT,
        "data": {"matches_manifest": bench.manifest.get("matches_manifest", True),
                 "domains": bench.manifest["domains"], "sequences": bench.manifest["sequences"],
                 "packages": bench.manifest["packages"]},
        "test_loss": {"base": base_loss, **{f"{s}/individual": v for s, v in ind_loss.items()}},
        "kept_share_test": test, "row_ci": cis, "paired_differences": comps,
        "chosen_on_val": bench.chosen, "not_run": bench.not_run,
        "configs": {s: {k: {"label": lab, **spec} for k, (lab, spec) in bench.rows.get(s, {}).items()}
                    for s in test},
        "quantile_grid_val": getattr(bench, "grid_val", {}),
        "drop_rate_spread": sp, "timings_s": timings,
        "merge_s": {s: {k: merge_seconds(bench.work / "runs" / f"{s}__{lab}")
                        for k, (lab, _) in bench.rows.get(s, {}).items()} for s in test},
    }
    (out_dir / "eval_llm.json").write_text(json.dumps(record, indent=1) + "\n")
    md = markdown(bench, record, test, cis, comps, sp, timings, png)
    (out_dir / "eval_llm.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if out_dir.resolve() == (REPO / "bench").resolve():     # a trial run elsewhere leaves the docs alone
        update_doc(REPO / "docs" / "EVAL_LLM.md", md[4:])


def markdown(bench, record, test, cis, comps, sp, timings, png) -> list[str]:
    doms = bench.domains
    tot = timings.get("total", 0)
    md = [f"# Merging benchmark: {len(doms)} text domains on a small LLaMA pretrained here",
          "",
          f"Generated by `scripts/eval_llm/bench.py --size {bench.size}` on {record['when']} "
          f"({record['machine']}); {record['parameters'] / 1e6:.2f} M parameters. The run took "
          f"{tot / 60:.1f} min of wall time in {timings.get('invocations', 1)} invocation(s) on one work "
          "directory (steps: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()
                                          if k not in ("total", "invocations"))
          + "). Numbers are the **share of the "
          "base-to-fine-tune held-out loss gap the merge keeps** (%, 100 = as good as each domain's own "
          "fine-tune, 0 = no better than the base), mean over domains; 95% CIs from a paired bootstrap "
          "over test sequences (2000 draws). Hyperparameters chosen on the validation split. "
          f"LoRA inputs: {record['lora_input']}.",
          "", "Test loss (nats/token): base " + ", ".join(f"{d} {v:.2f}" for d, v in record["test_loss"]["base"].items())
          + "; " + "; ".join(f"{SETTING_TITLE[s]} (each on its own domain) "
                             + ", ".join(f"{d} {v:.2f}" for d, v in record["test_loss"][f"{s}/individual"].items())
                             for s in test), ""]
    md += ["## Table 1: methods (mean kept share, %)", "",
           "| method | " + " | ".join(f"{SETTING_TITLE[s]} | 95% CI | chosen on val" for s in ("full", "lora")) + " |",
           "| --- | " + " | ".join("---: | --- | ---" for _ in ("full", "lora")) + " |"]
    for key, title in TABLE1:
        cells = []
        for s in ("full", "lora"):
            if key in test.get(s, {}):
                cells.append(f"**{pct(test[s][key]['mean'])}** | {ci(cis[s][key])} | {_hyper(bench, s, key)}")
            else:
                cells.append(f"not run | | {bench.not_run.get(f'{s}/{key}', '')[:60]}")
        md.append(f"| {title} | " + " | ".join(cells) + " |")
    md.append("| DARE + TADrop | n/a | | both are the sparsifier Phi: a config has one | n/a | | |")
    for s in ("full", "lora"):
        md += ["", f"### Table 1 per domain, {SETTING_TITLE[s]}", ""]
        md += domain_table(bench, s, TABLE1, test.get(s, {}), cis.get(s, {}))
    md += ["", f"## Table 4: EMR ablations ({SETTING_TITLE['full']})", ""]
    md += domain_table(bench, "full", TABLE4, test.get("full", {}), cis.get("full", {}))
    md += ["", "## Quantile sensitivity (EMR + TADrop, full fine-tunes; mean kept share %, "
           "**validation** split; a cross through the default a = 0.5, b = 0.95)", "",
           "| a \\ b | " + " | ".join(str(b) for b in bench_grid_b()) + " |",
           "| --- | " + " | ".join("---:" for _ in bench_grid_b()) + " |"]
    for a in bench_grid_a():
        cells = [pct(bench.grid_val[f"{a},{b}"]) if f"{a},{b}" in getattr(bench, "grid_val", {}) else "not run"
                 if a == 0.5 or b == 0.95 else "" for b in bench_grid_b()]
        md.append(f"| {a} | " + " | ".join(cells) + " |")
    lo, fu = bench.recipes["long"], bench.recipes["full"]
    md += ["", f"## Long fine-tunes ({lo.steps} steps of {lo.batch} sequences at lr {lo.lr}, vs "
           f"{fu.steps} of {fu.batch} at {fu.lr})", ""]
    md += domain_table(bench, "long", LONG, test.get("long", {}), cis.get("long", {}))
    md += ["", "### Where TADrop dropped: per-tensor drop rate d (EMR + TADrop runs, a = 0.5, b = 0.95)", "",
           "Over (tensor, task) pairs. Heatmap of the long setting (tensor type x layer, one panel per "
           f"domain): `{png.name}` (`tadrop report`).", ""]
    md += spread_table(sp) if any(sp.values()) else ["(no EMR + TADrop run with drop rates)"]
    md += ["", "## Paired differences (kept-share points, 95% CI, domains up / down)", "",
           "| setting | comparison | difference | 95% CI | domains up / down |",
           "| --- | --- | ---: | --- | ---: |"]
    for s, cs in comps.items():
        for title, r in cs.items():
            md.append(f"| {SETTING_TITLE[s]} | {title} | {100 * r['diff']:+.1f} | {ci(r)} | "
                      f"{r['domains_up']} / {r['domains_down']} |")
    if bench.not_run:
        md += ["", "**Not run** (the product does not offer the config yet): "
               + "; ".join(f"{k}: {v[:80]}" for k, v in bench.not_run.items())]
    if not record["data"]["matches_manifest"]:
        md += ["", "**The data did not match scripts/eval_llm/manifest.json**: numbers are not comparable."]
    return md


def bench_grid_a():
    import bench
    return bench.GRID_A


def bench_grid_b():
    import bench
    return bench.GRID_B


START, END = "<!-- eval-llm-tables:start -->", "<!-- eval-llm-tables:end -->"


def update_doc(doc: Path, lines: list[str]) -> None:
    """Replace the generated block of docs/EVAL_LLM.md; the prose around it stays hand-written."""
    eval_common.update_doc(doc, lines, START, END, lambda ln: ("#" + ln) if ln.startswith("#") else ln)
