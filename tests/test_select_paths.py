"""The exact selection methods (radix histograms, numpy partition, native counting) give the same
bits everywhere."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tadrop import MemorySink, MemorySource, MergeSpec, NonFiniteError, TADrop, TopK, merge_tensor, plan_tensor
from tadrop.select import ENV, AbsOrder, NativeOrder, available_methods, calibration, whole_method
from tadrop.sparsify import ChunkKey

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cases():
    g = torch.Generator().manual_seed(7)
    yield torch.randn(5000, generator=g) * 1e-3
    yield torch.randn(3000, generator=g).round()                  # heavy ties, zeros
    yield torch.zeros(100)                                         # all zero
    yield torch.tensor([2.5])                                      # one element
    yield (torch.rand(4096, generator=g) ** 6) * torch.sign(torch.randn(4096, generator=g))
    yield torch.full((777,), -3.0)                                 # one value


@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=300),
       st.lists(st.floats(0, 1), min_size=1, max_size=6))
@SETTINGS
def test_abs_order_matches_sorting(vals, fracs):
    x = torch.tensor(vals, dtype=torch.float32)
    srt = np.sort(np.abs(x.numpy()))
    o = AbsOrder(x)
    for f in fracs:
        r = min(len(vals) - 1, int(f * len(vals)))
        assert np.float32(o.value(r)).tobytes() == srt[r].tobytes()
        assert o.count_below(r) == int(np.count_nonzero(srt < srt[r]))
        assert o.quantile(f) == float(np.quantile(srt, f))


@pytest.mark.parametrize("phi", [TADrop(), TADrop(a=0.3, b=0.99, rescale="inverse_keep"),
                                 TADrop(rescale="none"), TopK(0.2), TopK(0.9), TopK(0.0)])
def test_fit_same_stats_and_values_both_methods(monkeypatch, phi):
    for x in _cases():
        got = {}
        for m in available_methods():
            monkeypatch.setenv(ENV, m)
            t = x.clone()
            st_ = phi.fit_apply_(t, ChunkKey())
            got[m] = (st_, t.numpy().tobytes(), phi.fit(x.clone()))
        assert all(got[m] == got["radix"] for m in got), (phi, x[:5])


@pytest.mark.parametrize("gv", [0.0, 0.37, 1.0])
def test_global_value_fit_same_both_methods(monkeypatch, gv):
    x = next(_cases())
    got = {}
    for m in available_methods():
        monkeypatch.setenv(ENV, m)
        t = x.clone()
        got[m] = (TADrop(scope="model").fit_apply_(t, ChunkKey(), global_value=gv), t.numpy().tobytes())
    assert all(got[m] == got["radix"] for m in got)


@pytest.mark.parametrize("phi", [TADrop(), TopK(0.3)])
def test_nonfinite_raises_in_both_methods(monkeypatch, phi):
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.randn(1000)
        x[123] = bad
        for m in available_methods():
            monkeypatch.setenv(ENV, m)
            with pytest.raises(NonFiniteError):
                phi.fit_apply_(x.clone(), ChunkKey())


@pytest.mark.parametrize("method,phi", [("emr", TADrop()), ("ties", TopK(0.2)), ("ties", TADrop())])
def test_merge_tensor_bit_identical_whole_fit_and_streamed(monkeypatch, method, phi):
    """Read once (either method), fitted whole then chunked (either method), fitted
    streamed (radix only): the same bits."""
    g = torch.Generator().manual_seed(3)
    shape, K = (64, 96), 3
    base = torch.randn(shape, generator=g) * 0.02
    tasks = [base + torch.randn(shape, generator=g) * 1e-3 for _ in range(K)]
    spec = MergeSpec(method, phi, tuple(f"t{k}" for k in range(K)))
    src = MemorySource(base, tasks)
    outs = []
    runs = [("radix", 1 << 30), ("partition", 1 << 30), ("partition", 500_000),
            ("radix", 500_000), ("partition", 60_000)]
    if "native" in available_methods():
        runs += [("native", 1 << 30), ("native", 500_000)]
    for m, budget in runs:
        monkeypatch.setenv(ENV, m)
        plan = plan_tensor(spec, shape, K, budget)
        sink = MemorySink(shape, K)
        res = merge_tensor(spec, "w", src, sink, plan)
        outs.append((plan.chunk_rows < shape[0], plan.fit_whole, res.stats,
                     {k: v.numpy().tobytes() for k, v in vars(sink).items() if isinstance(v, torch.Tensor)}))
    assert [o[:2] for o in outs][:5] == [(False, True), (False, True), (True, True), (True, True), (True, False)]
    assert all(o[2:] == outs[0][2:] for o in outs[1:])


def test_auto_choice_is_measured(monkeypatch):
    monkeypatch.setenv(ENV, "auto")
    m = whole_method("one")
    assert m in available_methods()
    cal = calibration()["one"]
    timed = set(available_methods()) - ({"radix"} if "native" in available_methods() else set())
    assert cal["chosen"] == m and set(cal["ns_per_element"]) == timed
    assert all(v > 0 for v in cal["ns_per_element"].values())
    assert whole_method("one", "meta") == "radix"                   # off-CPU: histograms only
    monkeypatch.setenv(ENV, "sorting")
    with pytest.raises(ValueError):
        whole_method("one")


def _tied(n, seed, zeros):
    """bf16-like task vector: differences of bf16 numbers, a fraction `zeros` exactly zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).bfloat16()
    tuned = (base.float() + torch.randn(n, generator=g) * 2e-3).bfloat16()
    tau = tuned.float() - base.float()
    tau[torch.rand(n, generator=g) < zeros] = 0.0
    return tau


@pytest.mark.parametrize("zeros", [0.0, 0.41, 0.97])
def test_abs_order_heavy_ties_exact_and_probed(monkeypatch, zeros):
    """Ranks inside long runs of equal values are settled by the probe's counts (no partition);
    every value and count still equals sorting, whether the probe hits, misses or is skipped."""
    import tadrop.select as S
    x = _tied(300_000, 3, zeros)
    srt = np.sort(np.abs(x.numpy()))
    ranks = [0, 1, 1000, 102_000, 123_000, 150_000, 150_001, 284_999, 285_000, 299_999]
    for probe_min in (1 << 16, 1 << 40):          # probed, and never probed
        monkeypatch.setattr(S, "_PROBE_MIN", probe_min)
        o = AbsOrder(x)
        for r in ranks:
            assert np.float32(o.value(r)).tobytes() == srt[r].tobytes(), (probe_min, r)
            assert o.count_below(r) == int(np.count_nonzero(srt < srt[r])), (probe_min, r)
        for p in (0.5, 0.95, 0.34):
            assert o.quantile(p) == float(np.quantile(srt, p))
        if probe_min == 1 << 40:
            assert not o._runs
        elif zeros >= 0.41:                        # rank 102_000 lies inside the run of zeros
            assert any(v == 0.0 for v, _, _ in o._runs)


@given(st.integers(0, 10**6), st.floats(0, 0.9), st.lists(st.floats(0, 1), min_size=1, max_size=8))
@SETTINGS
def test_abs_order_probe_matches_sorting(seed, zeros, fracs):
    import tadrop.select as S
    x = _tied(5000, seed, zeros)
    srt = np.sort(np.abs(x.numpy()))
    old = S._PROBE_MIN
    S._PROBE_MIN = 64                               # probe every segment worth partitioning
    try:
        o = AbsOrder(x)
        for f in fracs:
            r = min(len(srt) - 1, int(f * len(srt)))
            assert np.float32(o.value(r)).tobytes() == srt[r].tobytes()
            assert o.count_below(r) == int(np.count_nonzero(srt < srt[r]))
    finally:
        S._PROBE_MIN = old


@given(st.integers(0, 10**6), st.floats(0, 0.9), st.lists(st.floats(0, 1), min_size=1, max_size=8))
@SETTINGS
def test_native_order_matches_sorting(seed, zeros, fracs):
    """Counting answers every rank as sorting does, in long runs of equal values or not."""
    if "native" not in available_methods():
        pytest.skip("the native kernels are not built on this install")
    x = _tied(5000, seed, zeros)
    x[::97] = -x[::97]
    srt = np.sort(np.abs(x.numpy()))
    o = NativeOrder(x)
    o.prepare([], between=(0, len(srt) - 1)) if seed % 2 else None   # many buckets in one pass
    for f in fracs:
        r = min(len(srt) - 1, int(f * len(srt)))
        assert np.float32(o.value(r)).tobytes() == srt[r].tobytes()
        assert o.count_below(r) == int(np.count_nonzero(srt < srt[r]))
        lo, hi = o.bucket_range(r)
        assert lo <= srt[r] <= hi
    for p in (0.5, 0.95, 0.3):
        assert o.quantile(p) == float(np.quantile(srt, p))
