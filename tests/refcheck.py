"""A finished run directory against tadrop's in-memory reference: outputs, per-task scalars,
exports and the stats table (shared by the EMR-mask, global-threshold and consensus tests)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.export import export_task
from pipeline.plan import build_spec
from pipeline.writers import MaskStore
from tadrop.reference import merge_state_dicts, task_model


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    sd = {}
    for f in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(d / f)))
    assert set(sd) == set(index["weight_map"])
    return sd


def reference(family: dict, cfg):
    base = load_file(str(Path(family["base"]) / "model.safetensors"))
    tasks = [load_file(str(Path(family[m.name]) / "model.safetensors")) for m in cfg.models]
    return base, merge_state_dicts(build_spec(cfg), base, tasks)


def assert_close_cast(got: torch.Tensor, want: torch.Tensor, name: str):
    """Streamed and whole-tensor maths agree to float32 rounding; compared after the one final cast."""
    want = want.to(got.dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def check_run(tmp_path: Path, family: dict, cfg, run: Path, *, exports: bool = True):
    """Returns the reference result after asserting the run equals it."""
    base, ref = reference(family, cfg)
    assert json.loads((run / "run.json").read_text())["complete"] is True
    if ref.merged is not None:
        got = load_dir(run / "merged")
        for name, want in ref.merged.items():
            assert_close_cast(got[name], want, name)
    attrs = {}
    if ref.masks:
        store = MaskStore.open(run / "masks.zarr")
        attrs = store.attrs
        for name, want in ref.masks.items():
            for k in range(len(cfg.models)):
                np.testing.assert_array_equal(store.read(name, k).reshape(want[k].shape), want[k].numpy(),
                                              err_msg=f"mask {name} task {k}")
    if ref.unified is not None:
        got_uni = load_dir(run / "unified")
        for name, want in ref.unified.items():
            assert_close_cast(got_uni[name], want, name)
    names = [m.name for m in cfg.models]
    if cfg.method == "emr":
        for k, n in enumerate(names):
            assert attrs["emr_lambdas"][n] == pytest.approx(ref.scalars["emr_lambdas"][k], rel=1e-9)
        want_scales = ref.scalars.get("emr_tensor_scales")
        if want_scales is None:
            assert "emr_tensor_scales" not in attrs
        else:
            assert set(attrs["emr_tensor_scales"]) == set(want_scales)
            for t, v in want_scales.items():
                assert attrs["emr_tensor_scales"][t] == pytest.approx(v, rel=1e-9), t
    if exports and cfg.method in ("emr", "tall_masks"):
        for k, n in enumerate(names):
            got = load_dir(export_task(run, n, tmp_path / f"export_{n}"))
            want = task_model(ref, base, k)
            for name in base:
                assert_close_cast(got[name], want[name], f"{n}/{name}")
    table = pq.read_table(run / "stats.parquet").to_pylist()
    assert len(table) == len(ref.stats)
    by_key = {(r["tensor"], r["task"]): r for r in table}
    for r in ref.stats:
        got_row = by_key[(r["tensor"], r["task"])]
        assert got_row["numel"] == r["numel"] and got_row["kept"] == r["kept"], (r["tensor"], r["task"])
        for col in ("q_a", "q_b", "drop_rate", "norm_before", "norm_after", "mask_density"):
            if r.get(col) is None:
                assert got_row[col] is None, col
            else:
                assert got_row[col] == pytest.approx(r[col], rel=1e-5, abs=1e-12), col
    return base, ref


def load_base(family: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(family["base"]) / "model.safetensors"))
