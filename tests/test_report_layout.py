"""The report heatmap at LLM scale (32-80 layers x 8-30 tasks): a colour range from the data with its
bar, legible non-overlapping ticks, a per-type summary panel, a size that stays viewable."""
from __future__ import annotations

import random

import pytest

from pipeline.report import MIN_FONT, figure, plot

KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]


def llm_rows(layers: int, tasks: int, lo=0.3, hi=0.5):
    rnd = random.Random(layers * 100 + tasks)
    names = [f"model.layers.{i}.{k}.weight" for i in range(layers) for k in KINDS]
    names += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    return [{"tensor": n, "task": f"task-{t:02d}", "numel": 4096, "drop_rate": lo + (hi - lo) * rnd.random(),
             "kept": 2048, "q_a": None, "q_b": None, "norm_before": None, "norm_after": None,
             "mask_density": None} for t in range(tasks) for n in names]


def _no_overlap(labels, renderer, axis):
    boxes = [l.get_window_extent(renderer) for l in labels if l.get_text()]
    boxes.sort(key=lambda b: b.x0 if axis == "x" else b.y0)
    for a, b in zip(boxes, boxes[1:]):
        assert (a.x1 <= b.x0 + 0.5) if axis == "x" else (a.y1 <= b.y0 + 0.5), (a, b)


@pytest.mark.parametrize("layers,tasks", [(32, 8), (80, 30)])
def test_layout_at_llm_scale(layers, tasks, tmp_path):
    import matplotlib.pyplot as plt
    fig, info = figure(llm_rows(layers, tasks))
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    w, h = info["size_px"]
    assert w <= 3200 and h <= 4000
    assert 0.29 <= info["vmin"] < 0.32 and 0.48 < info["vmax"] <= 0.51      # from the data, not 0-1
    assert info["colorbar"].mappable.get_clim() == (info["vmin"], info["vmax"])
    summ = info["summary"]
    assert [t.get_text() for t in summ.get_xticklabels()] == [f"task-{t:02d}" for t in range(tasks)]
    assert len(summ.get_yticklabels()) >= 12                                 # one row per tensor type
    assert len(info["panels"]) == tasks
    for ax in [summ, *info["panels"]]:
        for lab in ax.get_xticklabels() + ax.get_yticklabels():
            assert lab.get_fontsize() >= MIN_FONT
        _no_overlap(ax.get_xticklabels(), r, "x")
        _no_overlap(ax.get_yticklabels(), r, "y")
        xt = [t.get_text() for t in ax.get_xticklabels()]
        if ax is not summ:
            assert "0" in xt and "other" in xt and 5 <= len(xt) <= 25
    plt.close(fig)
    out = plot(llm_rows(layers, tasks), tmp_path / "r.png")
    from PIL import Image
    assert Image.open(tmp_path / "r.png").size == out["size_px"]
