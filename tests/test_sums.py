"""Float64 sums over float32 data (tadrop._buffers): the same bits however the stream is cut, and
the per-task batched version equal to separate streams."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tadrop._buffers import SUM_BLOCK, Sum64, Sum64Rows, sumsq64, sumsq64_pair

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cuts(n, draws):
    cuts = sorted({min(n, d) for d in draws} | {0, n})
    return list(zip(cuts[:-1], cuts[1:]))


@given(n=st.integers(0, 5 * SUM_BLOCK + 17), draws=st.lists(st.integers(0, 6 * SUM_BLOCK), max_size=6),
       op=st.sampled_from(["sum", "abs", "square"]), seed=st.integers(0, 99))
@SETTINGS
def test_sum64_same_bits_for_any_cut(n, draws, op, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e3
    whole = Sum64("cpu", op)
    whole.add(x)
    cut = Sum64("cpu", op)
    for a, b in _cuts(n, draws):
        cut.add(x[a:b])
    assert whole.value() == cut.value()
    f = {"sum": lambda v: v, "abs": abs, "square": lambda v: v * v}[op]
    exact = math.fsum(f(float(v)) for v in x.tolist())
    assert whole.value() == pytest.approx(exact, rel=1e-12, abs=1e-300)


@given(K=st.integers(1, 5), n=st.integers(0, 4 * SUM_BLOCK + 33),
       draws=st.lists(st.integers(0, 5 * SUM_BLOCK), max_size=5), op=st.sampled_from(["sum", "abs"]),
       seed=st.integers(0, 99))
@SETTINGS
def test_sum64_rows_equal_separate_streams(K, n, draws, op, seed):
    """EMR's per-task sums go through one Sum64Rows: each row's value has the bits of its own Sum64."""
    x = torch.randn(K, n, generator=torch.Generator().manual_seed(seed))
    x[:, ::7] = 0.0
    rows = Sum64Rows(K, "cpu", op)
    single = [Sum64("cpu", op) for _ in range(K)]
    for a, b in _cuts(n, draws):
        rows.add(x[:, a:b])
        for k in range(K):
            single[k].add(x[k, a:b])
    got = [rows.value(k) for k in range(K)]
    want = [s.value() for s in single]
    assert np.array(got).tobytes() == np.array(want).tobytes()


@given(n=st.integers(1, 3 * SUM_BLOCK + 41), q=st.floats(0, 1), seed=st.integers(0, 99),
       ties=st.booleans())
@SETTINGS
def test_sumsq64_pair_equals_two_passes(n, q, seed, ties):
    """TADrop's one-pass (||tau||^2, ||tau_hat||^2) has the bits of a pass over tau and a pass over
    tau with |tau| < t zeroed, t one of the data's own values (ties at t are kept)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 1e-3
    if ties:                                       # few distinct values, exact zeros: bf16-like
        x = (x * 256).round() / 256
    t = float(np.sort(np.abs(x.numpy()))[min(n - 1, int(q * n))])
    dropped = torch.where(x.abs() >= t, x, torch.zeros(()))
    S, S_hat = sumsq64_pair(x, t if t > 0 else None)
    assert S == sumsq64(x)
    assert S_hat == (sumsq64(dropped) if t > 0 else 0.0)
