"""`tadrop report`: the heatmap PNG and the numbers of the text summary.

The unit tests write their own stats.parquet (the schema of SPEC section 4) so
every figure in the summary is known in advance; the end-to-end test reports
on a real small EMR + TADrop run through the CLI.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.report import heatmap_grid, layer_of, tensor_type, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SCHEMA = pa.schema([
    pa.field("tensor", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("numel", pa.int64(), nullable=False),
    pa.field("q_a", pa.float64()), pa.field("q_b", pa.float64()),
    pa.field("drop_rate", pa.float64()), pa.field("kept", pa.int64()),
    pa.field("norm_before", pa.float64()), pa.field("norm_after", pa.float64()),
    pa.field("mask_density", pa.float64()),
])


def _write_stats(run: Path, rows: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    cols = [f.name for f in SCHEMA]
    pq.write_table(pa.Table.from_pydict({c: [r.get(c) for r in rows] for c in cols}, schema=SCHEMA),
                   run / "stats.parquet")


def _row(tensor: str, task: str, numel: int, d: float | None) -> dict:
    kept = None if d is None else numel - math.floor(d * numel)
    return {"tensor": tensor, "task": task, "numel": numel, "q_a": 0.1, "q_b": 0.2,
            "drop_rate": d, "kept": kept, "norm_before": 1.0, "norm_after": 1.0,
            "mask_density": None if kept is None else kept / numel}


# Two layers of a LLaMA-shaped model plus embeddings; drop rates chosen by hand.
D = {
    ("model.layers.0.self_attn.q_proj.weight", "math"): 0.50,
    ("model.layers.1.self_attn.q_proj.weight", "math"): 0.70,
    ("model.layers.0.mlp.down_proj.weight", "math"): 0.25,
    ("model.layers.1.mlp.down_proj.weight", "math"): 0.75,
    ("model.embed_tokens.weight", "math"): 0.10,
    ("model.layers.0.self_attn.q_proj.weight", "code"): 0.40,
    ("model.layers.1.self_attn.q_proj.weight", "code"): 0.60,
    ("model.layers.0.mlp.down_proj.weight", "code"): 0.20,
    ("model.layers.1.mlp.down_proj.weight", "code"): 0.80,
    ("model.embed_tokens.weight", "code"): 0.30,
}
NUMEL = {"model.layers.0.self_attn.q_proj.weight": 100, "model.layers.1.self_attn.q_proj.weight": 100,
         "model.layers.0.mlp.down_proj.weight": 200, "model.layers.1.mlp.down_proj.weight": 200,
         "model.embed_tokens.weight": 400}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _write_stats(run, [_row(t, k, NUMEL[t], d) for (t, k), d in D.items()])
    masks = run / "masks.zarr"
    (masks / "a" / "c").mkdir(parents=True)
    (masks / "zarr.json").write_bytes(b"x" * 300)
    (masks / "a" / "c" / "0").write_bytes(b"y" * 1234)
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_names_parse_into_types_and_layers():
    assert layer_of("model.layers.3.self_attn.q_proj.weight") == 3
    assert layer_of("encoder.layer.11.attention.self.key.bias") == 11
    assert layer_of("transformer.h.2.attn.c_attn.weight") == 2
    assert layer_of("model.embed_tokens.weight") is None
    cases = {
        "model.layers.0.self_attn.q_proj.weight": "attn.q.weight",
        "model.layers.0.self_attn.o_proj.weight": "attn.o.weight",
        "model.layers.0.mlp.gate_proj.weight": "mlp.gate.weight",
        "model.layers.0.mlp.up_proj.weight": "mlp.up.weight",
        "model.layers.0.mlp.down_proj.weight": "mlp.down.weight",
        "model.layers.0.input_layernorm.weight": "norm.attn.weight",
        "model.layers.0.post_attention_layernorm.weight": "norm.mlp.weight",
        "model.norm.weight": "norm.weight",
        "model.embed_tokens.weight": "embed.weight",
        "lm_head.weight": "head.weight",
        "encoder.layer.0.attention.self.query.bias": "attn.q.bias",
        "encoder.layer.0.attention.self.key.weight": "attn.k.weight",
        "encoder.layer.0.attention.self.value.weight": "attn.v.weight",
        "encoder.layer.0.attention.output.dense.weight": "attn.o.weight",
        "encoder.layer.0.attention.output.LayerNorm.bias": "norm.attn.bias",
        "encoder.layer.0.intermediate.dense.weight": "mlp.up.weight",
        "encoder.layer.0.output.dense.bias": "mlp.down.bias",
        "encoder.layer.0.output.LayerNorm.weight": "norm.mlp.weight",
        "embeddings.position_embeddings.weight": "embed.weight",
        "transformer.h.0.attn.c_attn.weight": "attn.qkv.weight",
        "transformer.h.0.mlp.c_proj.weight": "mlp.down.weight",
    }
    assert {n: tensor_type(n) for n in cases} == cases


def test_heatmap_grid_layers_types_and_other_column(run: Path):
    rows = pq.read_table(run / "stats.parquet").to_pylist()
    types, layers, vals = heatmap_grid(rows, "math")
    assert types == ["attn.q.weight", "mlp.down.weight", "embed.weight"]
    assert layers == ["0", "1", "other"]
    assert vals[0][:2] == [0.5, 0.7] and math.isnan(vals[0][2])
    assert vals[1][:2] == [0.25, 0.75]
    assert vals[2][2] == pytest.approx(0.10) and math.isnan(vals[2][0])


def test_report_writes_png_and_text_with_the_right_numbers(run: Path):
    text = write_report(run)
    w, h = _png_size(run / "report.png")
    assert w > 200 and h > 100
    assert (run / "report.txt").read_text() == text
    lines = text.splitlines()

    def line(prefix: str) -> list[str]:
        hit = [ln for ln in lines if ln.strip().startswith(prefix)]
        assert hit, f"no line starting with {prefix!r} in:\n{text}"
        return hit[0].split()

    # per tensor type over (tensor, task): q_proj {.5,.7,.4,.6}, down_proj {.25,.75,.2,.8}
    assert line("attn.q.weight")[1:] == ["4", "0.5500", "0.4000", "0.7000"]
    assert line("mlp.down.weight")[1:] == ["4", "0.5000", "0.2000", "0.8000"]
    assert line("embed.weight")[1:] == ["2", "0.2000", "0.1000", "0.3000"]
    # per task: mean, min, max, parameter-weighted
    w_math = (50 + 70 + 50 + 150 + 40) / 1000
    w_code = (40 + 60 + 40 + 160 + 120) / 1000
    assert line("math ")[1:] == ["0.4600", "0.1000", "0.7500", f"{w_math:.4f}"]
    assert line("code ")[1:] == ["0.4600", "0.2000", "0.8000", f"{w_code:.4f}"]
    kept = sum(NUMEL[t] - math.floor(d * NUMEL[t]) for (t, _), d in D.items())
    assert f"parameters kept: {kept:,} of 2,000" in text
    assert "mask storage: 1,534 bytes" in text
    assert f"{8 * 1534 / 2000:.3f} bits per masked parameter" in text


def test_report_png_to_another_path(run: Path, tmp_path: Path):
    out = tmp_path / "elsewhere" / "heat.png"
    text = write_report(run, out)
    _png_size(out)
    assert not (run / "report.png").exists()
    assert str(out) in text


def test_no_drop_rate_gives_a_message_not_a_blank_plot(tmp_path: Path):
    run = tmp_path / "ta"
    _write_stats(run, [_row(t, k, NUMEL[t], None) for (t, k) in D])
    text = write_report(run)
    assert "no drop rates in this run" in text
    assert "no heatmap written" in text
    assert not (run / "report.png").exists()
    assert "mask storage" not in text


def test_missing_stats_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="stats.parquet"):
        write_report(tmp_path)


@pytest.mark.slow
def test_report_on_a_real_emr_tadrop_run(family, tmp_path: Path):
    """`tadrop merge` (EMR + TADrop) on tiny real checkpoints, then the report."""
    from conftest import run_cli, write_config
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", family, run, method="emr",
                       sparsify={"kind": "tadrop", "a": 0.5, "b": 0.95})
    run_cli("merge", cfg, "--quiet", check=True)
    rows = pq.read_table(run / "stats.parquet").to_pylist()
    assert any(r["drop_rate"] for r in rows)
    text = run_cli("report", run, check=True).stdout
    assert text.strip() == (run / "report.txt").read_text().strip()
    _png_size(run / "report.png")
    assert (run / "masks.zarr").is_dir() and "mask storage" in text
    kept = sum(r["kept"] for r in rows)
    assert f"parameters kept: {kept:,} of {sum(r['numel'] for r in rows):,}" in text
    for name in (n for n in family if n != "base"):
        assert any(ln.strip().startswith(name + " ") for ln in text.splitlines())
    assert "attn.q.weight" in text and "mlp.down.weight" in text
