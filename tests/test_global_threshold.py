"""TADrop scope `global_threshold` (SPEC 1): a model-wide d per task, then one magnitude threshold per
task over all of its merged entries (k = floor(d N)), rescaled per tensor. Engine and pipeline (local,
row-chunked, Ray; with and without the third histogram pass) against the reference."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.ledger import Ledger
from pipeline.run import merge
from tadrop import MergeSpec, TADrop, merge_state_dicts

from conftest import tree_digest, write_config, write_hf_family
from ray_fixtures import ray_session  # noqa: F401 - the session's Ray instance
from refcheck import check_run
from test_emr_mask import PLANS, engine_vs_reference, model_values, state_dicts

GT = {"kind": "tadrop", "a": 0.5, "b": 0.95, "rescale": "norm", "scope": "global_threshold"}


def spread(seed=0, shapes=((160, 128), (96, 128)), K=2):
    """Zero base; |tau| 45% log-uniform in [1e-30, 1e-3], 10% in [1e-2, 1], 45% in [1.5, 2.5]: the
    threshold's rank lies where the values spread over far more hi buckets than the first lo pass
    takes, so the model-wide threshold needs the third pass."""
    g = torch.Generator().manual_seed(seed)
    base = {f"layer.{i}.weight": torch.zeros(s) for i, s in enumerate(shapes)}
    tasks = []
    for _ in range(K):
        t = {}
        for n, v in base.items():
            u, r = torch.rand(v.shape, generator=g), torch.rand(v.shape, generator=g)
            tiny = torch.exp(math.log(1e-30) + r * math.log(1e27))
            mid = torch.exp(math.log(1e-2) + r * math.log(1e2))
            mag = torch.where(u < 0.45, tiny, torch.where(u < 0.55, mid, 1.5 + r))
            t[n] = v + mag * torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)
        tasks.append(t)
    return base, tasks


@pytest.mark.parametrize("rescale", ["norm", "none", "inverse_keep"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "emr", "tall_masks"])
def test_engine_matches_reference(method, rescale):
    base_sd, task_sds = state_dicts(3, seed=2)
    spec = MergeSpec(method, TADrop(rescale=rescale, scope="global_threshold"), ("a", "b", "c"),
                     weights=(1.0, 0.5, 2.0), tall_lambdas=(0.3, 0.4, 0.5))
    for plan in ("whole", "chunked"):
        engine_vs_reference(spec, base_sd, task_sds, PLANS[plan])


@pytest.mark.parametrize("mode", ["rescaled", "mask"])
def test_third_pass_matches_reference(mode):
    base_sd, task_sds = spread()
    spec = MergeSpec("emr", TADrop(rescale="inverse_keep", scope="global_threshold"), ("a", "b"),
                     emr_tadrop=mode)
    assert all(model_values(spec, base_sd, task_sds, list(base_sd))[1])     # the bracket missed
    engine_vs_reference(spec, base_sd, task_sds, PLANS["chunked"])


def test_one_threshold_per_task_over_the_model():
    """The kept entries of a task are exactly its N - floor(d N) largest |tau| over the whole model
    (d the model-wide rate), the realised rates differ between tensors, and scope `model` instead
    drops the fraction d of every tensor."""
    base_sd, task_sds = state_dicts(2, seed=5)
    ref = merge_state_dicts(MergeSpec("task_arithmetic", TADrop(scope="global_threshold"), ("a", "b")),
                            base_sd, task_sds)
    uni = merge_state_dicts(MergeSpec("task_arithmetic", TADrop(scope="model"), ("a", "b")), base_sd, task_sds)
    for task, tk in zip(("a", "b"), task_sds):
        a = torch.cat([(tk[n] - base_sd[n]).abs().reshape(-1) for n in ref.merged_names])
        d = [r["drop_rate"] for r in uni.stats if r["task"] == task][0]
        t = torch.sort(a).values[math.floor(d * a.numel())]
        assert int((a == t).sum()) == 1                     # no tie at the threshold in this data
        rows = [r for r in ref.stats if r["task"] == task]
        assert sum(r["kept"] for r in rows) == a.numel() - math.floor(d * a.numel())
        assert len({round(r["drop_rate"], 6) for r in rows if r["numel"] > 1}) > 1
        assert all(r["drop_rate"] == d for r in uni.stats if r["task"] == task)


# -- through the pipeline ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spread_family(tmp_path_factory):
    return write_hf_family(tmp_path_factory.mktemp("spread"), *spread())


def _run(tmp_path, family, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", family, tmp_path / "run", **kw))
    merge(cfg, quiet=True)
    return cfg, tmp_path / "run"


def _thr_jobs(run):
    done = Ledger(run / ".tadrop" / "ledger.jsonl").done()
    return {k: v for k, v in done.items() if k.startswith("global_thr:")}


def test_pipeline_without_third_pass(tmp_path, family):
    cfg, run = _run(tmp_path, family, method="ties", sparsify={**GT, "rescale": "inverse_keep"})
    check_run(tmp_path, family, cfg, run)
    thr = _thr_jobs(run)
    assert thr and all(v == {"skipped": True} for v in thr.values())


def test_pipeline_with_third_pass_chunked(tmp_path, spread_family):
    kw = dict(method="emr", sparsify=GT, emr={"tadrop": "mask"})
    cfg, run = _run(tmp_path / "a", spread_family, **kw)
    check_run(tmp_path / "a", spread_family, cfg, run)
    thr = _thr_jobs(run)
    assert thr and all("file" in v for v in thr.values())
    _, chunked = _run(tmp_path / "b", spread_family, memory_budget="64KiB", workers=1, **kw)
    assert json.loads((chunked / ".tadrop" / "plan.json").read_text())["summary"]["chunked_tensors"] > 0
    assert tree_digest(run) == tree_digest(chunked)


@pytest.mark.slow
def test_ray_equals_local(tmp_path, spread_family, ray_session):  # noqa: F811
    from cluster.actors import ActorResources
    from cluster.ray_executor import RayExecutor
    kw = dict(method="task_arithmetic", sparsify=GT)
    _, local = _run(tmp_path / "local", spread_family, **kw)
    cfg = load_config(write_config(tmp_path / "ray.yaml", spread_family, tmp_path / "ray", executor="ray", **kw))
    ex = RayExecutor(2, resources=ActorResources(num_cpus=1, memory=256 * 2**20))
    try:
        merge(cfg, quiet=True, executor=ex)
    finally:
        ex.close()
    assert all("file" in v for v in _thr_jobs(tmp_path / "ray").values())
    assert tree_digest(tmp_path / "ray") == tree_digest(local)


def test_config(tmp_path, family):
    with pytest.raises(ConfigError, match="sparsify.scope"):
        load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "r",
                                 sparsify={"kind": "topk", "scope": "global_threshold"}))
    cfg = load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "r", sparsify=GT))
    assert cfg.identity()["sparsify"]["scope"] == "global_threshold"
