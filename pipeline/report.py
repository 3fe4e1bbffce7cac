"""`tadrop report RUN`: where did TADrop drop, and what does the run keep?

A heatmap of drop rates (rows: tensor types, columns: layers, one panel per
task), like the TADrop paper's Figures 5-7, plus a short text summary. Reads
only `stats.parquet` (and sizes the files of `masks.zarr` on disk), so it is
cheap on any run, however large the model.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Layer index: LLaMA/Mistral `model.layers.3.`, BERT `encoder.layer.3.`,
# GPT-2 `transformer.h.3.`, others `blocks.3.`.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
NO_LAYER = "other"   # column for tensors outside the layer stack (embeddings, final norm, head)

# Most specific first: the first pattern found in the name decides the type.
_TYPES: list[tuple[str, str]] = [
    (r"(q_proj|\.query\b|\.q_lin\b|\.wq\b)", "attn.q"),
    (r"(k_proj|\.key\b|\.k_lin\b|\.wk\b)", "attn.k"),
    (r"(v_proj|\.value\b|\.v_lin\b|\.wv\b)", "attn.v"),
    (r"(qkv|c_attn|query_key_value)", "attn.qkv"),
    (r"(input_layernorm|attention\.output\.layernorm|ln_1|attention_norm|sa_layer_norm)", "norm.attn"),
    (r"(post_attention_layernorm|output\.layernorm|ln_2|ffn_norm|output_layer_norm)", "norm.mlp"),
    (r"(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|\.wo\b|\.out_lin\b)", "attn.o"),
    (r"(gate_proj|\.w1\b)", "mlp.gate"),                       # Mixtral: w1 gate, w3 up, w2 down
    (r"(up_proj|intermediate\.dense|\.fc1\b|c_fc|lin1|\.w3\b)", "mlp.up"),
    (r"(down_proj|\.output\.dense|\.fc2\b|mlp\.c_proj|lin2|\.w2\b)", "mlp.down"),
    (r"(norm|ln_f|layernorm)", "norm"),
    (r"(embed|wte|wpe)", "embed"),
    (r"(lm_head|classifier|score)", "head"),
]
_TYPE_ORDER = ["attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "norm.attn",
               "mlp.gate", "mlp.up", "mlp.down", "norm.mlp", "norm", "embed", "head", "other"]


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def tensor_type(name: str) -> str:
    """'attn.q.weight', 'mlp.down.bias', 'norm.mlp.weight', 'embed.weight', ..."""
    low = name.lower()
    stem, _, leaf = low.rpartition(".")
    if leaf not in ("weight", "bias"):
        stem, leaf = low, ""
    kind = next((t for pat, t in _TYPES if re.search(pat, stem)), "other")
    return f"{kind}.{leaf}" if leaf else kind


def _type_key(t: str) -> tuple[int, str]:
    base = t.rsplit(".", 1)[0] if t.endswith((".weight", ".bias")) else t
    return (_TYPE_ORDER.index(base) if base in _TYPE_ORDER else len(_TYPE_ORDER), t)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def load_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "stats.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stats table (is {run_dir} a finished tadrop run?)")
    try:
        return pq.read_table(path).to_pylist()
    except pa.ArrowException as e:   # a damaged file: one line naming it, never a traceback
        raise ReportError(f"{path}: unreadable stats table ({e})") from None


class ReportError(ValueError):
    """The run's stats table cannot be read."""


def _tasks_in_order(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r["task"], None)
    return list(seen)


def summarize(rows: list[dict], run_dir: Path) -> tuple[str, bool]:
    """The text summary, and whether there is any drop rate to plot."""
    tasks = _tasks_in_order(rows)
    tensors = {r["tensor"] for r in rows}
    with_d = [r for r in rows if r["drop_rate"] is not None and not math.isnan(r["drop_rate"])]
    lines = [f"run: {run_dir}", f"tasks: {len(tasks)} ({', '.join(tasks)}); "
             f"tensors: {len(tensors)}; parameters per task: {sum(_numel_by_tensor(rows).values()):,}"]
    if not with_d:
        lines.append("no drop rates in this run: stats.parquet has drop_rate = null for every row "
                     "(the method's sparsifier has no per-tensor drop rate, e.g. sparsify kind "
                     "none, topk or dare); nothing to plot.")
    else:
        lines += ["", "drop rate by tensor type (over tensors x tasks):",
                  f"  {'type':<18} {'n':>5} {'mean':>7} {'min':>7} {'max':>7}"]
        by_type: dict[str, list[float]] = defaultdict(list)
        for r in with_d:
            by_type[tensor_type(r["tensor"])].append(r["drop_rate"])
        for t in sorted(by_type, key=_type_key):
            v = by_type[t]
            lines.append(f"  {t:<18} {len(v):>5} {sum(v) / len(v):>7.4f} {min(v):>7.4f} {max(v):>7.4f}")
        lines += ["", "drop rate by task:",
                  f"  {'task':<18} {'mean':>7} {'min':>7} {'max':>7} {'weighted':>9}"]
        for task in tasks:
            rs = [r for r in with_d if r["task"] == task]
            if not rs:
                lines.append(f"  {task:<18} {'-':>7}")
                continue
            v = [r["drop_rate"] for r in rs]
            w = sum(r["drop_rate"] * r["numel"] for r in rs) / max(1, sum(r["numel"] for r in rs))
            lines.append(f"  {task:<18} {sum(v) / len(v):>7.4f} {min(v):>7.4f} {max(v):>7.4f} {w:>9.4f}")
        lines.append("  (weighted: by parameter count, = fraction of the task's parameters dropped)")
    kept_rows = [r for r in rows if r["kept"] is not None]
    if kept_rows:
        kept = sum(r["kept"] for r in kept_rows)
        total = sum(r["numel"] for r in kept_rows)
        lines += ["", f"parameters kept: {kept:,} of {total:,} ({kept / max(1, total):.2%}) over all tasks"]
        for task in tasks:
            rs = [r for r in kept_rows if r["task"] == task]
            if rs:
                k, n = sum(r["kept"] for r in rs), sum(r["numel"] for r in rs)
                lines.append(f"  {task:<18} {k:,} of {n:,} ({k / max(1, n):.2%})")
    masks = Path(run_dir) / "masks.zarr"
    if masks.is_dir():
        nbytes = _dir_bytes(masks)
        bits = sum(r["numel"] for r in rows)   # one mask bit per (parameter, task)
        lines += ["", f"mask storage: {nbytes:,} bytes ({_fmt_bytes(nbytes)}) in the files of masks.zarr, "
                  f"{8 * nbytes / max(1, bits):.3f} bits per masked parameter"]
    return "\n".join(lines) + "\n", bool(with_d)


def _numel_by_tensor(rows: list[dict]) -> dict[str, int]:
    return {r["tensor"]: r["numel"] for r in rows}


def heatmap_grid(rows: list[dict], task: str) -> tuple[list[str], list[str], list[list[float]]]:
    """(row labels, column labels, values) for one task; NaN where no tensor.

    A cell averages its tensors weighted by parameter count (the `other`
    column can hold several, e.g. word and position embeddings)."""
    acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        d = r["drop_rate"]
        if r["task"] != task or d is None or math.isnan(d):
            continue
        layer = layer_of(r["tensor"])
        cell = acc[(tensor_type(r["tensor"]), NO_LAYER if layer is None else str(layer))]
        cell[0] += d * r["numel"]
        cell[1] += r["numel"]
    types = sorted({t for t, _ in acc}, key=_type_key)
    layers = sorted({c for _, c in acc if c != NO_LAYER}, key=int)
    if any(c == NO_LAYER for _, c in acc):
        layers.append(NO_LAYER)
    vals = [[acc[(t, c)][0] / acc[(t, c)][1] if (t, c) in acc and acc[(t, c)][1] else math.nan
             for c in layers] for t in types]
    return types, layers, vals


# Figure geometry, in inches at DPI: a 80-layer x 13-type panel stays ~8 x 2.4 in, 30 tasks fit in
# 3 columns, and every label is at least MIN_FONT points.
DPI = 100
MAX_WIDTH_IN = 30.0
CELL_W, CELL_H = 0.09, 0.17
MIN_FONT = 8


def _tick_step(n: int, max_ticks: int) -> int:
    """Label every step-th layer (1, 2, 4, 5, 8, 10, 16, 20...) so at most max_ticks show."""
    for step in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 40, 50, 64, 100):
        if math.ceil(n / step) <= max_ticks:
            return step
    return math.ceil(n / max_ticks)


def color_range(rows: list[dict]) -> tuple[float, float]:
    """The colour scale from the data: the 1st-99th percentile of the drop rates (a fixed 0-1 scale
    flattens rates that all lie in 0.3-0.5), widened to at least 0.02 so one value still shows."""
    import numpy as np
    v = np.array([r["drop_rate"] for r in rows if r["drop_rate"] is not None and not math.isnan(r["drop_rate"])])
    lo, hi = (float(np.percentile(v, 1)), float(np.percentile(v, 99))) if v.size else (0.0, 1.0)
    if hi - lo < 0.02:
        mid = (hi + lo) / 2
        lo, hi = max(0.0, mid - 0.01), min(1.0, mid + 0.01)
    return lo, hi


def figure(rows: list[dict]):
    """The report figure: a per-type x task summary panel on top, then one types x layers panel per
    task, one shared data-driven colour scale with its bar.  Returns (fig, info) for the layout test."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t for t in _tasks_in_order(rows)
             if any(r["task"] == t and r["drop_rate"] is not None for r in rows)]
    grids = [heatmap_grid(rows, t) for t in tasks]
    types = sorted({t for g in grids for t in g[0]}, key=_type_key)
    n_layers = max(len(g[1]) for g in grids)
    vmin, vmax = color_range(rows)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")

    label_w = 0.09 * max(len(t) for t in types) + 0.5           # y tick labels at MIN_FONT
    panel_w = max(3.0, CELL_W * n_layers + label_w)
    panel_h = CELL_H * len(types) + 0.75
    ncol = max(1, min(len(tasks), int(MAX_WIDTH_IN // panel_w)))
    nrow = math.ceil(len(tasks) / ncol)
    summ_w = max(3.0, 0.32 * len(tasks) + label_w)
    summ_h = CELL_H * len(types) + 1.6                          # rotated task names below
    width = max(panel_w * ncol, summ_w) + 1.0                   # + the colour bar
    height = summ_h + panel_h * nrow + 0.6
    fig = plt.figure(figsize=(width, height), dpi=DPI, layout="constrained")
    gs = fig.add_gridspec(nrow + 1, ncol, height_ratios=[summ_h] + [panel_h] * nrow)

    # summary: per tensor type and task, the parameter-weighted mean drop rate over all layers
    summ = fig.add_subplot(gs[0, :])
    acc = defaultdict(lambda: [0.0, 0])
    for r in rows:
        if r["drop_rate"] is not None and not math.isnan(r["drop_rate"]) and r["task"] in tasks:
            a = acc[(tensor_type(r["tensor"]), r["task"])]
            a[0] += r["drop_rate"] * r["numel"]
            a[1] += r["numel"]
    sv = np.ma.masked_invalid(np.array([[acc[(t, k)][0] / acc[(t, k)][1] if acc[(t, k)][1] else np.nan
                                         for k in tasks] for t in types], dtype=float))
    im = summ.imshow(sv, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    summ.set_title("mean drop rate by tensor type and task (all layers)", fontsize=MIN_FONT + 2)
    summ.set_yticks(range(len(types)), labels=types, fontsize=MIN_FONT)
    summ.set_xticks(range(len(tasks)), labels=tasks, fontsize=MIN_FONT, rotation=60, ha="right",
                    rotation_mode="anchor")
    if len(tasks) <= 12 and len(types) <= 16:
        for i in range(len(types)):
            for j in range(len(tasks)):
                if not np.ma.is_masked(sv[i, j]):
                    frac = (sv[i, j] - vmin) / max(vmax - vmin, 1e-12)
                    summ.text(j, i, f"{sv[i, j]:.2f}", ha="center", va="center", fontsize=MIN_FONT - 1,
                              color="white" if frac < 0.6 else "black")

    panels = []
    max_ticks = max(2, int((panel_w - label_w) / 0.35))         # ~0.35 in per layer label
    for idx, (task, (ttypes, layers, vals)) in enumerate(zip(tasks, grids)):
        ax = fig.add_subplot(gs[1 + idx // ncol, idx % ncol])
        full = np.full((len(types), len(layers)), np.nan)
        for i, t in enumerate(ttypes):
            full[types.index(t)] = vals[i]
        ax.imshow(np.ma.masked_invalid(full), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                  interpolation="nearest")
        ax.set_title(task, fontsize=MIN_FONT + 1)
        step = _tick_step(len(layers), max_ticks)
        ticks = [j for j in range(len(layers)) if j % step == 0 or layers[j] == NO_LAYER]
        if len(ticks) > 1 and layers[ticks[-1]] == NO_LAYER and ticks[-1] - ticks[-2] < step / 2:
            ticks.pop(-2)                                        # keep 'other' clear of its neighbour
        ax.set_xticks(ticks, labels=[layers[j] for j in ticks], fontsize=MIN_FONT)
        if idx % ncol == 0:
            ax.set_yticks(range(len(types)), labels=types, fontsize=MIN_FONT)
        else:
            ax.set_yticks(range(len(types)), labels=[])
        if idx // ncol == nrow - 1 or idx + ncol >= len(tasks):
            ax.set_xlabel("layer", fontsize=MIN_FONT)
        panels.append(ax)
    fig.suptitle(f"TADrop drop rate per tensor: {len(tasks)} tasks x {n_layers} layer columns "
                 f"(colour scale {vmin:.2f}-{vmax:.2f}, from the data; grey: no tensor)", fontsize=MIN_FONT + 3)
    cbar = fig.colorbar(im, ax=[summ, *panels], shrink=0.6, aspect=40, pad=0.01)
    cbar.set_label("drop rate", fontsize=MIN_FONT + 1)
    cbar.ax.tick_params(labelsize=MIN_FONT)
    info = {"vmin": vmin, "vmax": vmax, "ncol": ncol, "nrow": nrow, "summary": summ, "panels": panels,
            "colorbar": cbar, "size_px": (round(width * DPI), round(height * DPI))}
    return fig, info


def plot(rows: list[dict], out_png: Path) -> dict:
    import matplotlib.pyplot as plt
    fig, info = figure(rows)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    tmp.replace(out_png)
    return info


def write_report(run_dir: Path, out_png: Path | None = None) -> str:
    """Write RUN/report.txt and the heatmap (default RUN/report.png); return the text.

    With no drop rate in the run, the text says so and no PNG is written."""
    run_dir = Path(run_dir)
    rows = load_rows(run_dir)
    if not rows:
        text = f"run: {run_dir}\nstats.parquet is empty: nothing to report.\n"
        has_d = False
    else:
        text, has_d = summarize(rows, run_dir)
    png = Path(out_png) if out_png is not None else run_dir / "report.png"
    if has_d:
        plot(rows, png)
        text += f"\nheatmap: {png}\n"
    else:
        text += "\nno heatmap written.\n"
    text += storage_section(run_dir)
    (run_dir / "report.txt").write_text(text)
    return text


def storage_section(run_dir: Path) -> str:
    """The storage table (pipeline/storage.py): from run.json, or measured now for an older run."""
    import json

    from .storage import format_storage, run_storage
    try:
        record = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return ""
    rec = record.get("storage") or (run_storage(run_dir, record) if record.get("complete") else None)
    return "\n" + format_storage(rec) if rec else ""
