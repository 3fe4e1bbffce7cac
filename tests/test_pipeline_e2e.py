"""End to end on real files: every method through the pipeline equals tadrop's in-memory reference, run
on a spec built from the YAML values themselves (tests/yaml_spec.py), never through the pipeline's own
config-to-spec code; every key of the README config table is set to a non-default value in some case."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.export import export_task
from pipeline.run import merge
from pipeline.config import load_config
from pipeline.writers import MaskStore
from tadrop.reference import merge_state_dicts, task_model

from conftest import run_cli, tree_digest, write_config
from ulps import assert_ulps, delta_rel_error
from yaml_spec import out_dtype, spec_from_yaml, unified_dtype

TADROP = {"kind": "tadrop", "a": 0.5, "b": 0.95, "rescale": "norm", "scope": "tensor"}
WEIGHTS = [1.0, 0.6, 1.8, 1.25]   # models[].weight, task by task (`weights=True` in a case)

# Non-default values on purpose: a config value lost on its way to the maths changes the expected bytes.
CASES = {
    "ta": dict(method="task_arithmetic"),
    "ta_weights_lambda": dict(method="task_arithmetic", weights=True, **{"lambda": 0.55}),
    "ta_tadrop": dict(method="task_arithmetic", sparsify=TADROP, weights=True),
    "ta_tadrop_params": dict(method="task_arithmetic", **{"lambda": 0.45},
                             sparsify={"kind": "tadrop", "a": 0.35, "b": 0.9, "eps": 1e-5,
                                       "rescale": "inverse_keep"}),
    "ties": dict(method="ties"),
    "ties_tadrop": dict(method="ties", sparsify={**TADROP, "rescale": "none"}, weights=True,
                        **{"lambda": 0.8}),
    "ties_topk_model": dict(method="ties", sparsify={"kind": "topk", "density": 0.3, "scope": "model"},
                            **{"lambda": 1.3}),
    "ties_topk_density": dict(method="ties", sparsify={"kind": "topk", "density": 0.45}, weights=True,
                              model_sparsify={1: {"density": 0.7}}),
    "emr": dict(method="emr"),
    "emr_tadrop": dict(method="emr", sparsify=TADROP, weights=True),
    "emr_tadrop_model": dict(method="emr", sparsify={**TADROP, "scope": "model", "a": 0.45, "b": 0.97}),
    "emr_global": dict(method="emr", sparsify={**TADROP, "rescale": "inverse_keep"}, emr={"rescaler": "global"},
                       weights=True, output_dtype="float16"),
    "emr_mask_global_threshold": dict(method="emr", weights=True, emr={"tadrop": "mask"},
                                      sparsify={**TADROP, "scope": "global_threshold", "rescale": "inverse_keep"}),
    "tall": dict(method="tall_masks", tall={"lambdas": {"task0": 0.3, "task2": 0.55}, "default_lambda": 0.5}),
    "tall_ties": dict(method="tall_masks", tall={"lambdas": {"task1": 0.25}, "default_lambda": 0.35,
                                                 "inner": "ties"},
                      sparsify=TADROP, weights=True, output_dtype="bfloat16", unified_dtype="float32"),
    "consensus": dict(method="consensus", consensus={"k_min": 2, "alpha": 0.4, "inner": "task_arithmetic"},
                      tall={"lambdas": {"task1": 0.25}, "default_lambda": 0.45}, weights=True),
    "consensus_ties": dict(method="consensus", consensus={"k_min": 3, "alpha": 0.6, "inner": "ties"},
                           tall={"default_lambda": 0.3}),
    "ta_dare": dict(method="task_arithmetic", sparsify={"kind": "dare", "p": 0.3}, seed=7, weights=True,
                    **{"lambda": 0.5}),
    "ta_passthrough_bf16": dict(method="task_arithmetic", output_dtype="bfloat16", shard_size="20KB",
                                passthrough=["lm_head.weight", "model.layers.*.input_layernorm.weight"]),
}

# Every key of the README config table (and the other keys that change the output bytes) is set to a
# value other than its default in at least one case above: test_every_config_key_is_exercised.
COVERED_KEYS = {
    "method": "task_arithmetic", "sparsify.kind": None, "sparsify.a": 0.5, "sparsify.b": 0.95,
    "sparsify.eps": 1e-12, "sparsify.rescale": "norm", "sparsify.scope": "tensor", "sparsify.density": 0.2,
    "sparsify.p": None, "models[].weight": 1.0, "models[].sparsify": None, "lambda": None, "emr.rescaler": "official",
    "emr.tadrop": "rescaled",
    "tall.lambdas": {}, "tall.default_lambda": 0.4, "tall.inner": "task_arithmetic",
    "consensus.k_min": 2, "consensus.alpha": 0.3, "consensus.inner": "task_arithmetic",
    "passthrough": [], "output_dtype": None, "unified_dtype": None, "shard_size": "5GB", "seed": 0,
}


def case_yaml(family: dict, case: str, output: Path) -> dict:
    """The YAML mapping of a case (what write_config writes), with `weights=True` and
    `model_sparsify={index: {...}}` (models[].sparsify) spelled out."""
    kw = dict(CASES[case])
    names = [n for n in family if n != "base"]
    models = [{"name": n, "path": str(family[n])} for n in names]
    if kw.pop("weights", False):
        models = [{**m, "weight": WEIGHTS[i]} for i, m in enumerate(models)]
    for i, own in kw.pop("model_sparsify", {}).items():
        models[i] = {**models[i], "sparsify": own}
    return {"base": str(family["base"]), "models": models, "output": str(output), "workers": 2,
            "memory_budget": "256MiB", **kw}


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    sd = {}
    for f in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(d / f)))
    assert set(sd) == set(index["weight_map"])
    return sd


def reference(family: dict, data: dict):
    """tadrop.reference on the spec the YAML asks for, in float32 (the casts are compared separately)."""
    base = load_file(str(Path(family["base"]) / "model.safetensors"))
    tasks = [load_file(str(Path(family[m["name"]]) / "model.safetensors")) for m in data["models"]]
    return base, merge_state_dicts(spec_from_yaml(data), base, tasks, passthrough=data.get("passthrough", ()),
                                   out_dtype=torch.float32)


def merge_case(tmp_path: Path, family: dict, case: str | None = None, **kw) -> tuple[dict, Path]:
    """Merge a named case (plus overrides) or plain keys; returns the YAML mapping and the run dir."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = case_yaml(family, case, tmp_path / "run") if case else {}
    if not case:
        write_config(tmp_path / "cfg.yaml", family, tmp_path / "run", **kw)
        data = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    data.update(kw)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    merge(load_config(tmp_path / "cfg.yaml"), quiet=True)
    return data, tmp_path / "run"


# The pipeline sums in float64 blocks of 4096, the reference over whole tensors: the last bit before the
# single final cast may differ, never more.
MAX_ULPS = 1
# norms and EMR rescalers are float64 sums in another order: a few float64 roundings apart.
REL_F64 = 1e-12


def _check_stats(got_rows: list[dict], ref_stats: list[dict]) -> None:
    assert len(got_rows) == len(ref_stats)
    by_key = {(r["tensor"], r["task"]): r for r in got_rows}
    assert len(by_key) == len(got_rows), "duplicate (tensor, task) rows in stats.parquet"
    for r in ref_stats:
        got_row = by_key[(r["tensor"], r["task"])]
        where = (r["tensor"], r["task"])
        # order statistics and counts are exact (radix select = np.quantile bit for bit; k = floor(d n))
        for col in ("numel", "kept", "q_a", "q_b", "drop_rate", "mask_density"):
            assert got_row[col] == r.get(col), (where, col, got_row[col], r.get(col))
        for col in ("norm_before", "norm_after"):
            if r.get(col) is None:
                assert got_row[col] is None, (where, col)
            else:
                assert got_row[col] == pytest.approx(r[col], rel=REL_F64, abs=1e-300), (where, col)


BF16_CASES = ["emr_tadrop", "tall", "ties_tadrop", "consensus_ties"]


@pytest.mark.parametrize("case,fixture", [(c, "family") for c in sorted(CASES)]
                         + [(c, "family_bf16") for c in BF16_CASES])
def test_method_matches_reference(tmp_path, request, case, fixture):
    family = request.getfixturevalue(fixture)
    data, run = merge_case(tmp_path, family, case)
    base, ref = reference(family, data)
    names = [m["name"] for m in data["models"]]
    assert json.loads((run / "run.json").read_text())["complete"] is True
    f32_out = all(out_dtype(data, base[n]) == torch.float32 for n in ref.merged_names)

    if ref.merged is not None:
        got = load_dir(run / "merged")
        assert set(got) == set(base)
        for name, want in ref.merged.items():
            if name not in ref.merged_names:   # copied from the base: bit for bit, base dtype
                assert got[name].dtype == base[name].dtype and torch.equal(got[name], base[name]), name
                continue
            assert got[name].dtype == out_dtype(data, base[name]), name
            assert_ulps(got[name], want, name, MAX_ULPS)
            if f32_out:   # the error measured on the task delta's scale, not the weight's
                assert delta_rel_error(got[name], want, base[name]) < 1e-5, name
        assert (run / "merged" / "config.json").exists()
    if ref.masks:
        store = MaskStore.open(run / "masks.zarr")
        assert store.attrs["tasks"] == names
        for name, want in ref.masks.items():
            for k in range(len(names)):
                got_mask = store.read(name, k)
                np.testing.assert_array_equal(got_mask.reshape(want[k].shape), want[k].numpy(),
                                              err_msg=f"mask {name} task {k}")
        if data["method"] in ("tall_masks", "consensus"):
            got_l = store.attrs["tall_lambdas"]
            got_l = [got_l[n] for n in names] if isinstance(got_l, dict) else got_l
            assert got_l == ref.scalars["tall_lambdas"]
    if data["method"] in ("emr", "tall_masks"):
        got_uni = load_dir(run / "unified")
        stored = {}
        for name, want in ref.unified.items():
            assert got_uni[name].dtype == unified_dtype(data, base[name]), name
            assert_ulps(got_uni[name], want, f"unified {name}", MAX_ULPS)
            stored[name] = got_uni[name].float()
        if data["method"] == "emr":
            lambdas = MaskStore.open(run / "masks.zarr").attrs["emr_lambdas"]
            for k, n in enumerate(names):
                assert lambdas[n] == pytest.approx(ref.scalars["emr_lambdas"][k], rel=REL_F64)
        ref.unified = stored   # task models are built from the stored (cast) unified vector
        for k, n in enumerate(names):
            got = load_dir(export_task(run, n, tmp_path / f"export_{n}"))
            want = task_model(ref, {m: t.float() for m, t in base.items()}, k)
            assert set(got) == set(base)
            for name in base:
                assert got[name].dtype == (out_dtype(data, base[name]) if name in ref.merged_names
                                           else base[name].dtype), name
                assert_ulps(got[name], want[name], f"{n}/{name}", MAX_ULPS)

    _check_stats(pq.read_table(run / "stats.parquet").to_pylist(), ref.stats)


def _non_default_keys(data: dict) -> set[str]:
    seen = set()
    for key, default in COVERED_KEYS.items():
        if key.startswith("models[]."):
            field = key.split(".", 1)[1]
            hit = any(m.get(field, default) != default for m in data["models"])
        else:
            value = data
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            hit = value is not None and value != default
        if hit:
            seen.add(key)
    return seen


def test_every_config_key_is_exercised(family):
    """Each output-changing config key is set to a non-default value in some end-to-end case."""
    seen = set().union(*(_non_default_keys(case_yaml(family, c, Path("/x"))) for c in CASES))
    assert seen == set(COVERED_KEYS), sorted(set(COVERED_KEYS) - seen)
    kinds = {CASES[c].get("sparsify", {}).get("kind") for c in CASES}
    scopes = {(CASES[c].get("sparsify", {}).get("kind"), CASES[c].get("sparsify", {}).get("scope")) for c in CASES}
    rescales = {CASES[c].get("sparsify", {}).get("rescale") for c in CASES}
    assert {"tadrop", "topk", "dare", None} <= kinds
    assert {("tadrop", "model"), ("topk", "model")} <= scopes
    assert {"norm", "none", "inverse_keep"} <= rescales
    assert {CASES[c]["method"] for c in CASES} == {"task_arithmetic", "ties", "emr", "tall_masks", "consensus"}


@pytest.mark.parametrize("case", ["emr_tadrop", "ties_tadrop", "consensus", "ta_dare"])
def test_row_chunking_gives_identical_bytes(tmp_path, family_bf16, case):
    """A budget so small that every tensor is processed in row chunks: same bytes as one piece."""
    _, whole = merge_case(tmp_path / "a", family_bf16, case)
    _, chunked = merge_case(tmp_path / "b", family_bf16, case, memory_budget="24KiB")
    plan = json.loads((chunked / ".tadrop" / "plan.json").read_text())
    assert plan["summary"]["chunked_tensors"] > 0
    assert tree_digest(whole) == tree_digest(chunked)


def test_workers_do_not_change_bytes(tmp_path, family_bf16):
    _, one = merge_case(tmp_path / "a", family_bf16, "emr_tadrop", workers=1)
    _, two = merge_case(tmp_path / "b", family_bf16, "emr_tadrop", workers=2)
    assert tree_digest(one) == tree_digest(two)


def test_cli_merge_status_export(tmp_path, family):
    cfg = write_config(tmp_path / "cfg.yaml", family, tmp_path / "run", method="emr", sparsify=TADROP)
    dry = run_cli("merge", cfg, "--dry-run", check=True)
    assert "jobs:" in dry.stdout and not (tmp_path / "run").exists()
    assert run_cli("status", tmp_path / "run").returncode == 2
    proc = run_cli("merge", cfg, "--quiet", check=True)
    assert proc.stderr.strip() == ""
    st = run_cli("status", tmp_path / "run")
    assert st.returncode == 0 and "complete" in st.stdout
    again = run_cli("merge", cfg, check=True)  # a finished run is left as it is
    assert "already complete" in again.stderr
    ex = run_cli("export", tmp_path / "run", "--task", "task1", "--output", tmp_path / "t1", check=True)
    assert (tmp_path / "t1" / "model.safetensors.index.json").exists(), ex.stdout
    bad = run_cli("export", tmp_path / "run", "--task", "nope", "--output", tmp_path / "t2")
    assert bad.returncode == 1 and "task 'nope' is not in run" in bad.stderr


def test_output_dtype_and_passthrough(tmp_path, family):
    _, run = merge_case(tmp_path, family, "ta_passthrough_bf16")
    got = load_dir(run / "merged")
    base = load_file(str(Path(family["base"]) / "model.safetensors"))
    assert got["lm_head.weight"].dtype == torch.float32
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])
    assert got["model.norm.weight"].dtype == torch.bfloat16
    index = json.loads((run / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
