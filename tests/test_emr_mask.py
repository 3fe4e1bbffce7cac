"""EMR + TADrop, the `mask` integration (SPEC 2): flag and tau_uni from the raw weighted tau_k,
M_k = sign mask AND TADrop's keep mask, TADrop's per-tensor rescale factor stored beside lambda_k.
Engine (whole, row-chunked, streamed fit) and pipeline (local, chunked, Ray) against the reference."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.run import merge
from tadrop import (AbsSelector, MemorySink, MemorySource, MergeSpec, TADrop, TensorPlan, TopK, emr_rescalers,
                    global_extra_ranks, global_pass_extra, global_pass_hi, global_pass_lo, global_select,
                    global_values, merge_state_dicts, merge_tensor, task_model)
from tadrop.reference import _emr

from conftest import run_cli, tree_digest, write_config
from refcheck import check_run

TADROP = {"kind": "tadrop", "a": 0.5, "b": 0.95, "rescale": "norm", "scope": "tensor"}
PLANS = {"whole": TensorPlan(1 << 30, True, 0), "chunked": TensorPlan(7, False, 0),
         "fit_whole": TensorPlan(5, True, 0), "base_whole": TensorPlan(5, True, 0, base_whole=True)}


def state_dicts(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"emb": torch.randn(50, 16, generator=g), "attn.w": torch.randn(24, 16, generator=g),
            "norm": torch.ones(16), "scalar": torch.tensor(0.5), "steps": torch.arange(4)}
    tasks = []
    for k in range(K):
        scale = 0.01 * (1 + k)
        t = {n: (v + torch.distributions.Laplace(0.0, scale).sample(v.shape) if v.is_floating_point()
                 else v.clone()) for n, v in base.items()}
        t["norm"][:4] = 1.0                                   # exact zeros in tau
        tasks.append(t)
    return base, tasks


def model_values(spec, base_sd, task_sds, names, rows=3):
    """The model-scope passes as the driver runs them: hi, select, lo, (extra lo), values."""
    src = lambda n: MemorySource(base_sd[n], [t[n] for t in task_sds])  # noqa: E731
    plan = TensorPlan(rows, False, 0)
    G = None
    for n in names:
        parts = [AbsSelector.from_numpy(s.to_numpy()) for s in global_pass_hi(spec, n, src(n), plan)]
        G = parts if G is None else [g.merge(p) or g for g, p in zip(G, parts)]
    global_select(spec, G)
    selected = [AbsSelector.from_numpy(g.to_numpy()) for g in G]     # what the jobs load
    for n in names:
        for g, p in zip(G, global_pass_lo(spec, n, src(n), plan, selected)):
            g.merge_lo(AbsSelector.from_numpy(p.to_numpy()))
    extra = global_extra_ranks(spec, G)
    if any(extra):
        for n in names:
            for g, p in zip(G, global_pass_extra(spec, n, src(n), plan, selected, extra)):
                g.merge_lo(AbsSelector.from_numpy(p.to_numpy()))
    return global_values(spec, G), extra


def engine_vs_reference(spec, base_sd, task_sds, plan):
    ref = merge_state_dicts(spec, base_sd, task_sds)
    gv = (model_values(spec, base_sd, task_sds, ref.merged_names)[0]
          if spec.sparsifier.scope != "tensor" else None)
    partials, scales = [], {}
    for n in ref.merged_names:
        sink = MemorySink(base_sd[n].shape, spec.K)
        res = merge_tensor(spec, n, MemorySource(base_sd[n], [t[n] for t in task_sds]), sink, plan, gv)
        partials.append(res.emr)
        scales[n] = res.emr_scales
        if ref.merged is not None:
            torch.testing.assert_close(sink.merged_t, ref.merged[n], rtol=1e-6, atol=1e-7)
        if ref.unified is not None:
            torch.testing.assert_close(sink.unified_t, ref.unified[n], rtol=1e-6, atol=1e-7)
        if ref.masks:
            assert torch.equal(sink.masks_t, ref.masks[n]), n
        want = [r for r in ref.stats if r["tensor"] == n]
        for got, exp in zip(res.stats, want):
            for col, v in exp.items():
                if isinstance(v, float):
                    assert got[col] == pytest.approx(v, rel=1e-9, abs=1e-15), (n, col)
                else:
                    assert got[col] == v, (n, col)
    if spec.method == "emr":
        lam, _ = emr_rescalers(partials, spec.emr_rescaler, spec.task_names)
        assert lam == pytest.approx(ref.scalars["emr_lambdas"], rel=1e-12)
        if spec.emr_mask_mode:
            for n, v in ref.scalars["emr_tensor_scales"].items():
                assert scales[n] == pytest.approx(v, rel=1e-12), n
        else:
            assert all(s is None for s in scales.values()) and "emr_tensor_scales" not in ref.scalars
    return ref


PHIS = [TADrop(rescale=r) for r in ("norm", "none", "inverse_keep")] + [
    TADrop(scope="model"), TADrop(rescale="inverse_keep", scope="global_threshold"), TopK(0.3)]


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("phi", PHIS, ids=repr)
@pytest.mark.parametrize("mode", ["rescaled", "mask"])
def test_engine_matches_reference(phi, mode, plan):
    base_sd, task_sds = state_dicts(3)
    spec = MergeSpec("emr", phi, ("a", "b", "c"), weights=(1.0, 0.5, 2.0), emr_tadrop=mode,
                     emr_rescaler="official")
    engine_vs_reference(spec, base_sd, task_sds, PLANS[plan])


def test_mask_mode_is_the_papers_wording():
    """The reference's mask mode, spelled out: the sign flag and tau_uni from the raw weighted tau_k,
    M_k = raw sign mask AND keep_k; and it is not the rescaled integration."""
    base_sd, task_sds = state_dicts(3, seed=4)
    w = (1.0, 0.5, 2.0)
    phi = TADrop(rescale="inverse_keep")
    mask = merge_state_dicts(MergeSpec("emr", phi, ("a", "b", "c"), weights=w, emr_tadrop="mask"),
                             base_sd, task_sds)
    resc = merge_state_dicts(MergeSpec("emr", phi, ("a", "b", "c"), weights=w), base_sd, task_sds)
    name = "emb"
    raw = torch.stack([(t[name] - base_sd[name]) * w[k] for k, t in enumerate(task_sds)])
    flag = torch.where(raw.double().sum(0) > 0, 1.0, -1.0).float()
    keep = torch.stack([(t[name] - base_sd[name]).abs() >= torch.sort((t[name] - base_sd[name]).abs()
                        .reshape(-1)).values[int(phi_d(t[name] - base_sd[name]) * raw[0].numel())]
                        for t in task_sds])
    M = (raw * flag > 0) & keep
    assert torch.equal(mask.masks[name], M)
    torch.testing.assert_close(mask.unified[name], flag * (raw * M).abs().amax(0))
    assert torch.equal(_emr(raw, keep)[1], M)
    # per task, the stored factor is TADrop's 1/(1-d) of that tensor; lambda_k from raw tau_k and M_k
    for k, t in enumerate(task_sds):
        d = phi_d(t[name] - base_sd[name])
        assert mask.scalars["emr_tensor_scales"][name][k] == pytest.approx(1.0 / (1.0 - d), rel=1e-12)
    assert not torch.equal(mask.masks[name], resc.masks[name])   # the sign elected differs
    # the task model multiplies lambda_k by the tensor's factor
    m1 = task_model(mask, base_sd, 1)
    lam = mask.scalars["emr_lambdas"][1] * mask.scalars["emr_tensor_scales"][name][1]
    assert torch.equal(m1[name], torch.where(M[1], base_sd[name] + mask.unified[name] * lam, base_sd[name]))


def phi_d(tau):
    import numpy as np
    a = tau.abs().reshape(-1).numpy()
    return min(max(float(np.quantile(a, 0.5)) / (float(np.quantile(a, 0.95)) + 1e-12), 0.0), 1.0)


# -- through the pipeline ----------------------------------------------------------------------------

def weighted_models(family, weights=(1.0, 0.5, 1.5, 2.0)):
    names = [n for n in family if n != "base"]
    assert len(names) <= len(weights)
    return [{"name": n, "path": str(family[n]), "weight": w} for n, w in zip(names, weights)]


CASES = {
    "mask_norm": dict(sparsify=TADROP),
    "mask_none": dict(sparsify={**TADROP, "rescale": "none"}),
    "mask_inverse_keep": dict(sparsify={**TADROP, "rescale": "inverse_keep"}, emr_rescaler="global"),
    "mask_model": dict(sparsify={**TADROP, "scope": "model"}),
    "mask_global_threshold": dict(sparsify={**TADROP, "scope": "global_threshold", "rescale": "inverse_keep"}),
    "mask_topk": dict(sparsify={"kind": "topk", "density": 0.3}),
    "rescaled_weighted": dict(sparsify=TADROP, tadrop="rescaled"),
}


def case_kw(family, case):
    c = dict(CASES[case])
    emr = {"tadrop": c.pop("tadrop", "mask"), "rescaler": c.pop("emr_rescaler", "official")}
    return dict(method="emr", emr=emr, models=weighted_models(family), **c)


def run_case(tmp_path, family, case, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", family, tmp_path / "run", **case_kw(family, case),
                                   **extra))
    merge(cfg, quiet=True)
    return cfg, tmp_path / "run"


FAST = ("mask_norm", "mask_inverse_keep", "mask_global_threshold")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(CASES)])
def test_pipeline_matches_reference(tmp_path, family, case):
    cfg, run = run_case(tmp_path, family, case)
    check_run(tmp_path, family, cfg, run)


@pytest.mark.parametrize("case", ["mask_global_threshold",
                                  pytest.param("mask_norm", marks=pytest.mark.slow)])
def test_row_chunking_and_workers_give_identical_bytes(tmp_path, family_bf16, case):
    _, whole = run_case(tmp_path / "a", family_bf16, case, workers=1)
    _, chunked = run_case(tmp_path / "b", family_bf16, case, memory_budget="24KiB")
    plan = json.loads((chunked / ".tadrop" / "plan.json").read_text())
    s = plan["summary"]
    assert s["chunked_tensors"] > 0
    assert 0 < s["chunked_input_bytes"] <= s["input_bytes"]   # what is read more than once
    unchunked = json.loads((whole / ".tadrop" / "plan.json").read_text())["summary"]
    assert unchunked["chunked_tensors"] == unchunked["chunked_input_bytes"] == 0
    assert tree_digest(whole) == tree_digest(chunked)


def test_config_keys_and_identity(tmp_path, family):
    bad = write_config(tmp_path / "bad.yaml", family, tmp_path / "run", method="emr", emr={"tadrop": "mask"})
    proc = run_cli("merge", bad)
    assert proc.returncode == 1 and "emr.tadrop" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    typo = write_config(tmp_path / "typo.yaml", family, tmp_path / "run", method="emr", sparsify=TADROP,
                        emr={"tadrop": "masked"})
    with pytest.raises(ConfigError, match="emr.tadrop"):
        load_config(typo)
    default = load_config(write_config(tmp_path / "d.yaml", family, tmp_path / "r", method="emr", sparsify=TADROP))
    assert default.emr.tadrop == "rescaled" and "tadrop" not in default.identity()["emr"]  # old run ids hold
    masked = load_config(write_config(tmp_path / "m.yaml", family, tmp_path / "r", method="emr", sparsify=TADROP,
                                      emr={"tadrop": "mask"}))
    assert masked.identity()["emr"]["tadrop"] == "mask"
    with pytest.raises(ValueError, match="emr_tadrop"):
        MergeSpec("emr", None, ("a",), emr_tadrop="mask")
