"""Per-model sparsifier parameters (topk density, DARE p, as mergekit's per-model `density`):
the streamed engine and the pipeline equal the reference, and each task really gets its own Phi."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.plan import build_spec
from pipeline.run import merge
from tadrop import (DARE, MemorySink, MemorySource, MergeSpec, TADrop, TopK, global_pass_hi,
                    global_pass_lo, global_values, merge_state_dicts, merge_tensor, plan_tensor)
from tadrop.streamed import TensorPlan

from conftest import write_config
from test_pipeline_e2e import load_dir

NAMES = ("a", "b", "c")


def _family(shape=(24, 10), K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * 0.01 * (k + 1) for k in range(K)]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("phis", [(TopK(0.1), TopK(0.5), TopK(0.9)),
                                  (DARE(0.1), DARE(0.5), DARE(0.8))])
def test_per_task_phi_equals_reference_and_single_task_runs(method, phis):
    base, tasks = _family()
    spec = MergeSpec(method, phis[0], NAMES, task_sparsifiers=phis, weights=(1.0, 0.5, 2.0), seed=4)
    ref = merge_state_dicts(spec, {"w": base}, [{"w": t} for t in tasks])
    for plan in (plan_tensor(spec, base.shape, 3, 1 << 30), TensorPlan(5, False, 0)):
        sink = MemorySink(base.shape, 3)
        res = merge_tensor(spec, "w", MemorySource(base, tasks), sink, plan)
        torch.testing.assert_close(sink.merged_t, ref.merged["w"], rtol=1e-6, atol=1e-6)
        assert [r["drop_rate"] for r in res.stats] == [r["drop_rate"] for r in ref.stats]
    # each task's stats are those of a one-task merge with its own Phi
    delta = torch.zeros_like(base, dtype=torch.float64)
    for k, phi in enumerate(phis):
        one = merge_state_dicts(MergeSpec(method, phi, (NAMES[k],), weights=(spec.weights[k],), lam=1.0, seed=4),
                                {"w": base}, [{"w": tasks[k]}])
        assert one.stats[0]["kept"] == ref.stats[k]["kept"]
        assert one.stats[0]["drop_rate"] == ref.stats[k]["drop_rate"]
        delta += one.merged["w"].double() - base.double()
    assert len({(r["kept"], r["drop_rate"]) for r in ref.stats}) == 3   # three different Phi really applied
    if method == "task_arithmetic":   # linear: the merge is the sum of the one-task merges
        torch.testing.assert_close(ref.merged["w"], (base.double() + spec.lam * delta).float(),
                                   rtol=1e-5, atol=1e-5)


def test_per_task_topk_model_scope_streamed_equals_reference():
    phis = (TopK(0.2, "model"), TopK(0.6, "model"), TopK(0.4, "model"))
    spec = MergeSpec("ties", phis[0], NAMES, task_sparsifiers=phis)
    tensors = {n: _family((s, 7), seed=i) for i, (n, s) in enumerate((("x", 13), ("y", 30)))}
    ref = merge_state_dicts(spec, {n: b for n, (b, _) in tensors.items()},
                            [{n: ts[k] for n, (_, ts) in tensors.items()} for k in range(3)])
    plans = {n: plan_tensor(spec, b.shape, 3, 1 << 30) for n, (b, _) in tensors.items()}
    sels = None
    for n, (b, ts) in tensors.items():
        part = global_pass_hi(spec, n, MemorySource(b, ts), plans[n])
        sels = part if sels is None else [s.merge(p) or s for s, p in zip(sels, part)]
    for n, (b, ts) in tensors.items():
        for s, p in zip(sels, global_pass_lo(spec, n, MemorySource(b, ts), plans[n], sels)):
            s.merge_lo(p)
    gv = global_values(spec, sels)
    assert len(set(gv)) == 3
    for n, (b, ts) in tensors.items():
        sink = MemorySink(b.shape, 3)
        merge_tensor(spec, n, MemorySource(b, ts), sink, plans[n], gv)
        torch.testing.assert_close(sink.merged_t, ref.merged[n], rtol=1e-6, atol=1e-6)


def test_spec_refuses_mixed_kinds():
    with pytest.raises(ValueError, match="kind and scope"):
        MergeSpec("ties", TopK(0.2), ("a", "b"), task_sparsifiers=(TopK(0.2), TADrop()))
    with pytest.raises(ValueError, match="one entry per task"):
        MergeSpec("ties", TopK(0.2), ("a", "b"), task_sparsifiers=(TopK(0.2),))


@pytest.mark.parametrize("sparsify,per", [({"kind": "topk", "density": 0.3}, [{"density": 0.8}, None, {"density": 0.1}]),
                                          ({"kind": "dare", "p": 0.3}, [{"p": 0.7}, {"p": 0.1}, None])])
def test_pipeline_per_model_sparsify_matches_reference(tmp_path, family, sparsify, per):
    path = write_config(tmp_path / "cfg.yaml", family, tmp_path / "run", method="ties", sparsify=sparsify, seed=3)
    cfg = load_config(path)
    cfg = cfg.model_copy(update={"models": [m.model_copy(update={"sparsify": p}) for m, p in zip(cfg.models, per)]})
    merge(cfg, quiet=True)
    from pathlib import Path
    from safetensors.torch import load_file
    base = load_file(str(Path(family["base"]) / "model.safetensors"))
    tasks = [load_file(str(Path(family[m.name]) / "model.safetensors")) for m in cfg.models]
    ref = merge_state_dicts(build_spec(cfg), base, tasks)
    got = load_dir(tmp_path / "run" / "merged")
    for name, want in ref.merged.items():   # streamed vs whole-tensor maths: float32 rounding
        torch.testing.assert_close(got[name].float(), want.to(got[name].dtype).float(), rtol=1e-6, atol=1e-6)
    spec = build_spec(cfg)
    assert spec.task_sparsifiers is not None and len({repr(p) for p in spec.task_sparsifiers}) == 3


def test_config_names_a_bad_per_model_parameter(tmp_path, family):
    def cfg_with(sparsify, per):
        p = write_config(tmp_path / "c.yaml", family, tmp_path / "run", method="ties", sparsify=sparsify)
        import yaml
        d = yaml.safe_load(p.read_text())
        d["models"][1]["sparsify"] = per
        p.write_text(yaml.safe_dump(d))
        return p
    with pytest.raises(ConfigError, match=r"models\.1\.sparsify\.p: not a per-model parameter of sparsify kind 'topk'"):
        load_config(cfg_with({"kind": "topk"}, {"p": 0.3}))
    with pytest.raises(ConfigError, match=r"models\.1\.sparsify\.density"):
        load_config(cfg_with({"kind": "topk"}, {"density": 1.5}))
    with pytest.raises(ConfigError, match=r"models\.1\.sparsify\.density: not a per-model parameter of sparsify kind 'tadrop'"):
        load_config(cfg_with({"kind": "tadrop"}, {"density": 0.5}))
    # no per-model key: identity unchanged from configs written before the key existed
    cfg = load_config(write_config(tmp_path / "d.yaml", family, tmp_path / "run", method="ties"))
    assert all("sparsify" not in m for m in cfg.identity()["models"])
