"""`inner: ties_official`: TIES inside TALL masks / consensus as the official TALL code builds it
(nik-dim/tall_masks src/eval/aggregation.py:109, :129 -> src/utils/ties_utils.py:49-59, utils.py:251-282):
a model-wide top-20% trim per task keeping one entry more than `topk`, zero sign sums resolved to the
model-wide majority sign, a disjoint SUM. Checked against a flattened-model transcription of those
steps, the reference, the engine (chunked) and the pipeline."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.run import merge
from tadrop import (MemorySink, MemorySource, MergeSpec, TADrop, TensorPlan, merge_state_dicts, merge_tensor,
                    ties_official_vector)
from tadrop.streamed import global_sign_count

from conftest import tree_digest, write_config, write_hf_family
from refcheck import check_run
from test_emr_mask import model_values, state_dicts


def official_flat(base_sd, task_sds, names, weights, lambdas, k_min, alpha):
    """The official steps on the whole flattened model (tau space, float64 sums as SPEC asks)."""
    tv = torch.stack([torch.cat([(t[n] - base_sd[n]).float().reshape(-1) for n in names]) for t in task_sds])
    N = tv.shape[1]
    kth = tv.abs().kthvalue(N - int(N * 0.2), dim=1, keepdim=True).values     # topk_values_mask, K=20
    w = torch.tensor(weights).reshape(-1, 1)
    trimmed = (tv * w) * (tv.abs() >= kth)
    signs = torch.sign(trimmed.double().sum(0))
    majority = torch.sign(signs.sum())                                          # resolve_zero_signs
    signs[signs == 0] = majority
    rows = torch.where(signs > 0, trimmed > 0, trimmed < 0)                     # disjoint_merge
    merged = (trimmed.double() * rows).sum(0).float()                           # 'dis-sum'
    wt = tv * w
    masks = torch.stack([wt[k].abs() > lambdas[k] * (merged - wt[k]).abs() for k in range(len(task_sds))])
    keep = masks.sum(0) >= k_min
    flat_base = torch.cat([base_sd[n].float().reshape(-1) for n in names])
    theta = torch.where(keep, flat_base + alpha * merged, flat_base)
    return merged, masks, theta, int(majority), int(((trimmed.double().sum(0) == 0) & (trimmed != 0).any(0)).sum())


def quantised(K=3, seed=0, bias=-0.15):
    """Zero base; tau in {0, +-2^-7, +-2^-6}: exact cancellations across tasks are common, and more
    negative than positive entries make the majority sign -1."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (40, 16), "b.weight": (24, 16), "c.bias": (16,)}
    base = {n: torch.zeros(s) for n, s in shapes.items()}
    tasks = []
    for _ in range(K):
        t = {}
        for n, s in shapes.items():
            u = torch.rand(s, generator=g)
            mag = torch.where(torch.rand(s, generator=g) < 0.5, 2.0 ** -7, 2.0 ** -6)
            t[n] = torch.where(u < 0.3, 0.0, torch.where(u < 0.65 - bias, -mag, mag))
        tasks.append(t)
    return base, tasks


def engine(spec, base_sd, task_sds, names, plan):
    gv = model_values(spec, base_sd, task_sds, names)[0]
    src = lambda n: MemorySource(base_sd[n], [t[n] for t in task_sds])  # noqa: E731
    total = sum(global_sign_count(spec, n, src(n), plan, gv) for n in names)
    majority = float((total > 0) - (total < 0))
    out = {}
    for n in names:
        sink = MemorySink(base_sd[n].shape, spec.K)
        merge_tensor(spec, n, src(n), sink, plan, gv, majority=majority)
        out[n] = sink
    return out, majority


@pytest.mark.parametrize("data", ["gaussian", "quantised"])
@pytest.mark.parametrize("method", ["consensus", "tall_masks"])
def test_official_transcription_reference_engine(method, data):
    base_sd, task_sds = state_dicts(3, seed=3) if data == "gaussian" else quantised()
    K, lam, weights = 3, (0.3, 0.4, 0.5), ((1.0, 0.5, 2.0) if data == "gaussian" else (1.0, 1.0, 1.0))
    spec = MergeSpec(method, None, ("a", "b", "c"), weights=weights, tall_lambdas=lam,
                     tall_inner="ties_official", consensus_inner="ties_official",
                     consensus_k_min=2, consensus_alpha=0.4)
    ref = merge_state_dicts(spec, base_sd, task_sds)
    names = ref.merged_names
    merged, masks, theta, majority, resolved = official_flat(base_sd, task_sds, names, weights, lam, 2, 0.4)
    if data == "quantised":
        assert majority == -1 and resolved > 0       # the majority rule decides some entries here
    off = 0
    got, got_majority = engine(spec, base_sd, task_sds, names, TensorPlan(5, False, 0))
    assert got_majority == majority
    for n in names:
        size = base_sd[n].numel()
        sl = slice(off, off + size)
        off += size
        want_masks = masks[:, sl].reshape(K, *base_sd[n].shape)
        assert torch.equal(ref.masks[n], want_masks), n
        assert torch.equal(got[n].masks_t, want_masks), n
        if method == "tall_masks":
            torch.testing.assert_close(ref.unified[n], merged[sl].reshape(base_sd[n].shape), rtol=0, atol=0)
            assert torch.equal(got[n].unified_t, ref.unified[n]), n
        else:
            torch.testing.assert_close(ref.merged[n], theta[sl].reshape(base_sd[n].shape), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(got[n].merged_t, ref.merged[n], rtol=1e-6, atol=1e-7)


def test_differs_from_inner_ties():
    """Not a rename: the official aggregation is a disjoint sum over a 20% trim, ours a disjoint mean."""
    base_sd, task_sds = state_dicts(3, seed=3)
    a = merge_state_dicts(MergeSpec("tall_masks", None, ("a", "b", "c"), tall_inner="ties_official"),
                          base_sd, task_sds)
    b = merge_state_dicts(MergeSpec("tall_masks", None, ("a", "b", "c"), tall_inner="ties"), base_sd, task_sds)
    assert not torch.equal(a.unified["emb"], b.unified["emb"])
    x = torch.tensor([[0.5, -0.5, 0.25], [0.5, 0.5, -0.25]])        # one-chunk check of the vector itself
    keep = torch.ones_like(x, dtype=torch.bool)
    assert ties_official_vector(x, keep, -1.0).tolist() == [1.0, -0.5, -0.25]   # sum; 0 -> majority -1
    assert ties_official_vector(x, keep, 1.0).tolist() == [1.0, 0.5, 0.25]


# -- through the pipeline ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantised_family(tmp_path_factory):
    return write_hf_family(tmp_path_factory.mktemp("quantised"), *quantised())


@pytest.mark.parametrize("method", ["consensus", "tall_masks"])
def test_pipeline_matches_reference(tmp_path, family, method):
    kw = {"tall": {"inner": "ties_official", "lambdas": {"task0": 0.3}}} if method == "tall_masks" else \
        {"consensus": {"inner": "ties_official", "k_min": 2, "alpha": 0.4}}
    cfg = load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "run", method=method, **kw))
    merge(cfg, quiet=True)
    check_run(tmp_path, family, cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / ".tadrop" / "plan.json").read_text())["summary"]["jobs_by_phase"][
        "global_sign"] == 21


def test_pipeline_majority_and_chunking(tmp_path, quantised_family):
    kw = dict(method="consensus", consensus={"inner": "ties_official", "k_min": 2, "alpha": 0.4})
    cfg = load_config(write_config(tmp_path / "a.yaml", quantised_family, tmp_path / "a", **kw))
    merge(cfg, quiet=True)
    check_run(tmp_path, quantised_family, cfg, tmp_path / "a")
    chunked = load_config(write_config(tmp_path / "b.yaml", quantised_family, tmp_path / "b",
                                       memory_budget="24KiB", workers=1, **kw))
    merge(chunked, quiet=True)
    assert json.loads((tmp_path / "b" / ".tadrop" / "plan.json").read_text())["summary"]["chunked_tensors"] > 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_config(tmp_path, family):
    with pytest.raises(ConfigError, match="consensus.inner"):
        load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "r", method="consensus",
                                 sparsify={"kind": "tadrop"}, consensus={"inner": "ties_official"}))
    with pytest.raises(ValueError, match="ties_official"):
        MergeSpec("tall_masks", TADrop(), ("a",), tall_inner="ties_official")
