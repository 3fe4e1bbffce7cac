"""The per-tensor engine (tadrop.streamed) against itself (chunked == whole, bit for bit)
and against the readable reference (tadrop.reference)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tadrop import (DARE, AbsSelector, Identity, MemorySink, MemorySource, MergeSpec, NonFiniteError, TADrop,
                    TensorPlan, TensorResult, TopK, global_pass_hi, global_pass_lo, global_select,
                    global_values, merge_state_dicts, merge_tensor, plan_tensor, task_model)
from tadrop.streamed import METHODS

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPARSIFIERS = [Identity(), TADrop(), TADrop(rescale="inverse_keep"), TopK(0.3), DARE(0.4)]
BIG = 1 << 40


def same_bits(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def family(shape, K, dtype=torch.float32, seed=0, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tasks = [base + torch.randn(shape, generator=g) * scale * (k + 1) for k in range(K)]
    return base.to(dtype), [t.to(dtype) for t in tasks]


def run(spec, name, base, tasks, plan, gv=None):
    sink = MemorySink(base.shape, spec.K)
    res = merge_tensor(spec, name, MemorySource(base, tasks), sink, plan, gv)
    return sink, res


def names(K):
    return tuple(f"task{k}" for k in range(K))


# -- streamed == whole --------------------------------------------------------------------------

shapes = st.one_of(st.just(()), st.tuples(st.integers(0, 40)), st.tuples(st.integers(1, 30), st.integers(1, 20)),
                   st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 7)))


@SETTINGS
@given(shape=shapes, K=st.integers(1, 4), method=st.sampled_from(METHODS), phi=st.sampled_from(SPARSIFIERS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), data=st.data())
def test_streamed_equals_whole_bit_for_bit(shape, K, method, phi, dtype, data):
    base, tasks = family(shape, K, dtype, seed=data.draw(st.integers(0, 99)))
    spec = MergeSpec(method, phi, names(K), weights=tuple(1.0 + 0.5 * k for k in range(K)), seed=3)
    whole_plan = plan_tensor(spec, shape, K, BIG)
    rows = shape[0] if shape else 1
    assert whole_plan.chunk_rows >= rows and whole_plan.fit_whole
    a, ra = run(spec, "w", base, tasks, whole_plan)
    fit_whole = data.draw(st.booleans())   # base_whole: the base held whole for the gathers, as at K = 32
    plan = TensorPlan(data.draw(st.integers(1, max(1, rows))), fit_whole, 0,
                      base_whole=fit_whole and data.draw(st.booleans()))
    b, rb = run(spec, "w", base, tasks, plan)
    for x, y in ((a.merged_t, b.merged_t), (a.unified_t, b.unified_t), (a.masks_t, b.masks_t)):
        assert same_bits(x, y)
    assert ra.to_dict() == rb.to_dict()
    assert TensorResult.from_dict(ra.to_dict()).to_dict() == ra.to_dict()
    outputs = {"merged": a.merged_t, "unified": a.unified_t, "masks": a.masks_t}
    if math.prod(shape):
        assert {k for k, v in outputs.items() if v is not None} == spec.outputs


def test_sources_are_never_written():
    for dtype in (torch.float32, torch.bfloat16):
        base, tasks = family((9, 7), 3, dtype)
        saved = [t.clone() for t in [base, *tasks]]
        for method in METHODS:
            spec = MergeSpec(method, TADrop(), names(3))
            for plan in (plan_tensor(spec, (9, 7), 3, BIG), TensorPlan(2, False, 0), TensorPlan(4, True, 0)):
                run(spec, "w", base, tasks, plan)
        assert all(torch.equal(s, t) for s, t in zip(saved, [base, *tasks]))


# -- against the reference ------------------------------------------------------------------------

def state_dicts(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"emb": torch.randn(50, 16, generator=g), "attn.w": torch.randn(24, 16, generator=g),
            "norm": torch.ones(16), "scalar": torch.tensor(0.5), "steps": torch.arange(4)}
    tasks = []
    for k in range(K):
        t = {n: (v + torch.randn(v.shape, generator=g) * 0.01 if v.is_floating_point() else v.clone())
             for n, v in base.items()}
        t["norm"][:4] = 1.0                                   # ties and exact zeros in tau
        tasks.append(t)
    return base, tasks


def model_scope_values(spec, base_sd, task_sds, merged_names):
    src = lambda n: MemorySource(base_sd[n], [t[n] for t in task_sds])  # noqa: E731
    plan = lambda n: TensorPlan(3, False, 0)  # noqa: E731
    G = None
    for n in merged_names:
        parts = [AbsSelector.from_numpy(s.to_numpy()) for s in global_pass_hi(spec, n, src(n), plan(n))]
        if G is None:
            G = parts
        else:
            for g, p in zip(G, parts):
                g.merge(p)
    global_select(spec, G)
    for n in merged_names:
        for g, p in zip(G, global_pass_lo(spec, n, src(n), plan(n), G)):
            g.merge_lo(AbsSelector.from_numpy(p.to_numpy()))
    return global_values(spec, G)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("phi", SPARSIFIERS + [TADrop(scope="model"), TopK(0.2, scope="model")],
                         ids=lambda p: repr(p))
def test_engine_matches_reference(method, phi):
    K = 3
    base_sd, task_sds = state_dicts(K)
    spec = MergeSpec(method, phi, names(K), weights=(1.0, 0.5, 2.0), tall_lambdas=(0.3, 0.4, 0.5), seed=11)
    ref = merge_state_dicts(spec, base_sd, task_sds)
    assert ref.merged_names == ["emb", "attn.w", "norm", "scalar"]
    gv = model_scope_values(spec, base_sd, task_sds, ref.merged_names) if phi.scope == "model" else None
    partials = []
    for n in ref.merged_names:
        sink, res = run(spec, n, base_sd[n], [t[n] for t in task_sds], TensorPlan(7, False, 0), gv)
        partials.append(res.emr)
        if ref.merged is not None:
            torch.testing.assert_close(sink.merged_t, ref.merged[n], rtol=1e-6, atol=1e-7)
        if ref.unified is not None:
            torch.testing.assert_close(sink.unified_t, ref.unified[n], rtol=1e-6, atol=1e-7)
        if ref.masks:
            assert torch.equal(sink.masks_t, ref.masks[n])
        want = [r for r in ref.stats if r["tensor"] == n]
        assert len(res.stats) == len(want) == K, (n, len(res.stats), len(want))
        for got, exp in zip(res.stats, want):
            assert got.keys() == exp.keys()
            for col, v in exp.items():
                if isinstance(v, float):
                    assert got[col] == pytest.approx(v, rel=1e-9, abs=1e-15), (n, col)
                else:
                    assert got[col] == v, (n, col)
    if method == "emr":
        from tadrop import emr_rescalers
        lam, _ = emr_rescalers(partials, spec.emr_rescaler, spec.task_names)
        assert lam == pytest.approx(ref.scalars["emr_lambdas"], rel=1e-12)
    if ref.merged is not None:
        assert torch.equal(ref.merged["steps"], base_sd["steps"])


def test_reference_task_models_and_errors():
    base_sd, task_sds = state_dicts(2)
    spec = MergeSpec("emr", TADrop(), names(2))
    ref = merge_state_dicts(spec, base_sd, task_sds)
    m1 = task_model(ref, base_sd, 1)
    lam = ref.scalars["emr_lambdas"][1]
    w = base_sd["attn.w"]
    want = torch.where(ref.masks["attn.w"][1], w + ref.unified["attn.w"] * lam, w)
    assert torch.equal(m1["attn.w"], want) and torch.equal(m1["steps"], base_sd["steps"])
    ta = merge_state_dicts(MergeSpec("task_arithmetic", None, names(2)), base_sd, task_sds,
                           passthrough=["norm"], out_dtype=torch.bfloat16)
    assert ta.merged["emb"].dtype == torch.bfloat16 and torch.equal(ta.merged["norm"], base_sd["norm"])
    bad = [dict(t) for t in task_sds]
    del bad[1]["emb"]
    with pytest.raises(ValueError, match="emb.*task1"):
        merge_state_dicts(spec, base_sd, bad)
    bad[1]["emb"] = torch.zeros(3)
    with pytest.raises(ValueError, match="emb.*shape"):
        merge_state_dicts(spec, base_sd, bad)


# -- plans, errors, devices -----------------------------------------------------------------------

def test_plan_tensor():
    spec = MergeSpec("emr", TADrop(), names(8))
    p = plan_tensor(spec, (4096, 11008), 8, 64 << 30)
    assert p.chunk_rows == 4096 and p.fit_whole
    p = plan_tensor(spec, (4096, 11008), 8, 1 << 30)
    assert 1 <= p.chunk_rows < 4096 and p.est_bytes <= (1 << 30) + streamed_fixed_bytes()
    p = plan_tensor(spec, (4096, 11008), 8, 64 << 20)
    assert not p.fit_whole and p.chunk_rows >= 1
    with pytest.raises(ValueError, match="lm_head.weight"):
        plan_tensor(spec, (10, 1 << 20), 8, 1 << 20, name="lm_head.weight")
    assert plan_tensor(spec, (0, 5), 8, 1).chunk_rows == 1


@pytest.mark.parametrize("phi", [Identity(), TADrop(), TopK(), TopK(scope="model")], ids=repr)
def test_nonfinite_error_names_tensor_and_task(phi):
    base, tasks = family((6, 5), 3)
    tasks[2] = tasks[2].clone()
    tasks[2][3, 1] = float("nan")
    spec = MergeSpec("task_arithmetic", phi, ("a", "b", "c"))
    gv = [0.1] * 3 if phi.scope == "model" else None
    plans = (plan_tensor(spec, (6, 5), 3, BIG), TensorPlan(2, False, 0), TensorPlan(2, True, 0),
             TensorPlan(2, True, 0, base_whole=True))
    for plan in plans:
        with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.w.*'c'"):
            run(spec, "model.layers.0.w", base, tasks, plan, gv)
    base = base.clone()
    base[0, 0] = float("inf")
    for plan in plans:
        with pytest.raises(NonFiniteError, match="layers.0.w.*base"):
            run(spec, "model.layers.0.w", base, tasks, plan, gv)


def test_model_scope_requires_global_values():
    base, tasks = family((4, 4), 2)
    spec = MergeSpec("task_arithmetic", TADrop(scope="model"), names(2))
    with pytest.raises(ValueError, match="global_values"):
        run(spec, "w", base, tasks, TensorPlan(4, True, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    base, tasks = family((64, 48), 3, torch.bfloat16)
    for method in METHODS:
        spec = MergeSpec(method, TADrop(), names(3))
        plan = TensorPlan(5, False, 0)
        a, ra = run(spec, "w", base, tasks, plan)
        sink = MemorySink(base.shape, 3)
        rb = merge_tensor(spec, "w", MemorySource(base, tasks), sink, plan, device="cuda")
        if a.masks_t is not None:
            assert torch.equal(a.masks_t, sink.masks_t)
        for x, y in ((a.merged_t, sink.merged_t), (a.unified_t, sink.unified_t)):
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        assert [r["kept"] for r in ra.stats] == [r["kept"] for r in rb.stats]


def test_scratch_pool_stays_near_the_plan():
    """Buffers reused across tensors, but those a tensor does not use are dropped once the
    pool would exceed that tensor's plan: no pile-up of every shape of work seen."""
    from tadrop import release_scratch
    from tadrop._buffers import scratch_bytes
    release_scratch()
    big = (256, 256)
    spec = MergeSpec("emr", TADrop(), names(4))
    base, tasks = family(big, 4)
    whole = plan_tensor(spec, big, 4, BIG)
    run(spec, "a", base, tasks, whole)
    after_whole = scratch_bytes()
    assert after_whole <= whole.est_bytes
    small_plan = plan_tensor(spec, big, 4, whole.est_bytes // 8)
    assert small_plan.chunk_rows < 256
    run(spec, "a", base, tasks, small_plan)
    assert scratch_bytes() <= max(small_plan.est_bytes, after_whole)
    release_scratch()
    assert scratch_bytes() == 0


# -- cache blocks ---------------------------------------------------------------------------------

BLOCK_SPECS = [
    ("ties", dict()), ("task_arithmetic", dict(sparsifier=DARE(0.3))),
    ("emr", dict(sparsifier=TADrop())), ("emr", dict(sparsifier=TADrop(), emr_tadrop="mask")),
    ("tall_masks", dict(tall_inner="ties", tall_grid=(0.2, 0.6))),
    ("consensus", dict(sparsifier=TopK(0.5), consensus_inner="ties")),
    ("tall_masks", dict(tall_inner="ties_official")),
]


@pytest.mark.parametrize("method,kw", BLOCK_SPECS, ids=lambda x: x if isinstance(x, str) else repr(x))
@pytest.mark.parametrize("chunk_rows", [40, 9])
def test_cache_blocks_never_change_a_bit(monkeypatch, method, kw, chunk_rows):
    """The engine's elementwise work runs in cache blocks (streamed.ENGINE_BLOCK) whose edges fall
    anywhere in a row: blocks of 1, 7 and 50 elements give the default's bytes and stats."""
    import tadrop.streamed as S
    K, shape = 3, (40, 33)
    base, tasks = family(shape, K, torch.bfloat16, seed=5)
    spec = MergeSpec(method, task_names=names(K), weights=(1.0, 0.5, 2.0), seed=7, **kw)
    gv = None
    if spec.official_ties:    # the model-wide trim thresholds and majority sign, as the pipeline finds them
        gv = [float(torch.quantile((t.float() - base.float()).abs().flatten(), 0.8)) for t in tasks]
    args = dict(majority=1.0) if spec.official_ties else {}
    plan = TensorPlan(chunk_rows, True, 0)

    class GridSink(MemorySink):
        def grid_masks(self, i, r0, r1, masks):
            self.grid = getattr(self, "grid", {})
            self.grid.setdefault(i, torch.zeros((K, *shape), dtype=torch.bool))[:, r0:r1] = masks

    def go():
        sink = GridSink(base.shape, K)
        res = merge_tensor(spec, "w", MemorySource(base, tasks), sink, plan, gv, **args)
        return sink, res
    a, ra = go()
    for block in (1, 7, 50):
        monkeypatch.setattr(S, "ENGINE_BLOCK", block)
        b, rb = go()
        for x, y in ((a.merged_t, b.merged_t), (a.unified_t, b.unified_t), (a.masks_t, b.masks_t)):
            assert same_bits(x, y), block
        if spec.tall_grid:
            assert a.grid.keys() == b.grid.keys() == {0, 1}
            assert all(torch.equal(a.grid[i], b.grid[i]) for i in a.grid), block
        assert ra.to_dict() == rb.to_dict(), block


def streamed_fixed_bytes() -> int:
    """What plan_tensor adds on top of the budget (histograms, float64 batches), at most 4 MiB."""
    from tadrop.streamed import _FIXED_BYTES
    assert _FIXED_BYTES <= 4 << 20
    return _FIXED_BYTES


@pytest.mark.parametrize("phi", [TADrop(), TADrop(rescale="inverse_keep"), TADrop(a=0.0, b=1.0), TopK(0.3),
                                 Identity()], ids=repr)
@pytest.mark.parametrize("chunk_rows", [40, 9])
def test_emr_fused_apply_same_bits(monkeypatch, phi, chunk_rows):
    """EMR's kernel applies Phi and the task weights in its own pass over each block (`pre`);
    with that turned off (prep applies them first, as for every other method) the bytes, masks,
    stats, rescaler sums and mask counts are the same, weights of both signs included."""
    from tadrop import native
    from tadrop.sparsify import Sparsifier
    if not native.available():
        pytest.skip("the native kernels are not built on this install")
    K, shape = 3, (40, 33)
    base, tasks = family(shape, K, torch.bfloat16, seed=9)
    tasks[1] = base.clone()                       # a task that changes nothing: its Phi keeps nothing
    spec = MergeSpec("emr", task_names=names(K), weights=(1.0, 0.5, -2.0), sparsifier=phi)
    plan = TensorPlan(chunk_rows, True, 0)
    seen = []
    real = native.emr_block

    def spy(*a, **kw):
        seen.append(kw.get("pre") is not None)
        return real(*a, **kw)
    monkeypatch.setattr(native, "emr_block", spy)
    a, ra = run(spec, "w", base, tasks, plan)
    assert seen and all(seen)                      # the kernel applied Phi itself
    seen.clear()
    monkeypatch.setattr(Sparsifier, "elementwise", lambda self, st: None)
    for cls in (TADrop, TopK):
        monkeypatch.setattr(cls, "elementwise", lambda self, st: None)
    b, rb = run(spec, "w", base, tasks, plan)
    assert seen and not any(seen)
    assert same_bits(a.unified_t, b.unified_t) and same_bits(a.masks_t, b.masks_t)
    assert ra.to_dict() == rb.to_dict()
    assert ra.mask_counts["hist"][0] > 0 and sum(ra.mask_counts["hist"]) == base.numel()
