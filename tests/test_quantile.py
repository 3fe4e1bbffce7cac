"""Exact order statistics of |x| (tadrop.quantile) against numpy, bit for bit."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tadrop import AbsSelector, NonFiniteError, abs_quantiles, kth_smallest_abs
from tadrop.quantile import linear_ranks, numpy_lerp

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(v: float) -> bytes:
    return np.float32(v).tobytes()


def np_quantile(x: torch.Tensor, p: float) -> float:
    return float(np.quantile(np.abs(x.numpy()), p))


# -- hand-computed ---------------------------------------------------------------------------

def test_hand_computed_order_statistics():
    x = torch.tensor([3.0, -1.0, 2.0, -2.0, 0.0])          # |x| sorted: 0 1 2 2 3
    assert [kth_smallest_abs(x, k) for k in range(1, 6)] == [0.0, 1.0, 2.0, 2.0, 3.0]
    # p = 0.5: virtual index 2 -> 2.0;  p = 0.95: index 3.8 -> 2 + 0.8 * (3 - 2) = 2.8 (as float32)
    q50, q95 = abs_quantiles(x, [0.5, 0.95])
    assert q50 == 2.0
    assert q95 == float(np.float32(2.8)) == 2.799999952316284
    assert abs_quantiles(x, [0.0, 1.0]) == [0.0, 3.0]


def test_linear_ranks_follow_numpy_indexing():
    assert linear_ranks(5, 0.5) == (2, 3, 0.0)
    lo, hi, g = linear_ranks(5, 0.95)
    assert (lo, hi) == (3, 4) and g == pytest.approx(0.8)
    assert linear_ranks(5, 1.0)[:2] == (4, 4)              # at the end both are the maximum
    assert linear_ranks(1, 0.3)[:2] == (0, 0)
    with pytest.raises(ValueError):
        linear_ranks(5, 1.5)


def test_numpy_lerp_matches_numpy_on_awkward_weights():
    a, b = 1.0000001, 7.25
    for t in (0.0, 0.25, 0.49999999999, 0.5, 0.75, 0.9999999):
        x = np.array([a, b], dtype=np.float32)
        want = float(np.quantile(x, t))            # two values: (n-1)*t = t exactly
        assert numpy_lerp(float(x[0]), float(x[1]), t) == want


def test_ties_zeros_negative_zero_and_subnormals():
    x = torch.tensor([-0.0, 0.0, 1e-45, -1e-45, 1e-40, 2.0, -2.0, 2.0, 3e38, -3e38], dtype=torch.float32)
    for p in (0.0, 0.1, 0.25, 0.33, 0.5, 0.77, 0.95, 1.0):
        assert bits(abs_quantiles(x, [p])[0]) == bits(np_quantile(x, p)), p
    srt = np.sort(np.abs(x.numpy()))
    for k in range(1, x.numel() + 1):
        assert bits(kth_smallest_abs(x, k)) == bits(srt[k - 1])


def test_nan_and_inf_raise():
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.tensor([1.0, bad, 2.0])
        with pytest.raises(NonFiniteError):
            kth_smallest_abs(x, 1)
        with pytest.raises(NonFiniteError):
            AbsSelector().add_hi(x)


def test_more_than_2_pow_24_elements():
    n = (1 << 24) + 3                              # torch.quantile refuses this size
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(n, generator=g) * 1e-3).half().float()   # many ties
    a = np.abs(x.numpy())
    k = n // 3 + 1
    assert kth_smallest_abs(x, k) == float(np.partition(a, k - 1)[k - 1])
    ours = abs_quantiles(x, [0.5, 0.95])
    assert [bits(v) for v in ours] == [bits(np.quantile(a, p)) for p in (0.5, 0.95)]


# -- properties ----------------------------------------------------------------------------------

special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 1e-40, 0.5, -0.5, 1.0, 3.4e38, -3.4e38])
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
values = st.one_of(finite32, special, st.integers(-3, 3).map(float))
arrays = st.lists(values, min_size=1, max_size=300).map(lambda v: torch.tensor(v, dtype=torch.float32))
probs = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.5, 0.95, 1.0, 1 / 3]))


@SETTINGS
@given(x=arrays, ps=st.lists(probs, min_size=1, max_size=4))
def test_quantiles_equal_numpy_bits(x, ps):
    got = abs_quantiles(x, ps)
    assert all(type(v) is float for v in got)
    assert [bits(v) for v in got] == [bits(np_quantile(x, p)) for p in ps]


@SETTINGS
@given(x=arrays, data=st.data())
def test_kth_equals_partition(x, data):
    k = data.draw(st.integers(1, x.numel()))
    assert bits(kth_smallest_abs(x, k)) == bits(np.partition(np.abs(x.numpy()), k - 1)[k - 1])


@SETTINGS
@given(x=arrays, data=st.data())
def test_pieces_merged_and_shipped_equal_whole(x, data):
    """Hi histograms of pieces merge (also through to_numpy/from_numpy); the lo pass may see
    the pieces in any order and cut differently: the answers equal the whole tensor's."""
    n = x.numel()
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    pieces = [x[a:b] for a, b in zip([0] + cuts, cuts + [n])]
    total = AbsSelector()
    for p in pieces:
        part = AbsSelector()
        part.add_hi(p)
        total.merge(AbsSelector.from_numpy(part.to_numpy()))
    assert total.n == n
    ps = data.draw(st.lists(probs, min_size=1, max_size=3))
    ranks = [r for p in ps for r in total.quantile_ranks(p)] + [data.draw(st.integers(0, n - 1))]
    total.select(ranks)
    recut = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    lo_pieces = [x[a:b] for a, b in zip([0] + recut, recut + [n])]
    for p in data.draw(st.permutations(lo_pieces)):
        total.add_lo(p)
    srt = np.sort(np.abs(x.numpy()))
    assert [bits(total.value(r)) for r in ranks] == [bits(srt[r]) for r in ranks]
    assert [bits(total.quantile(p)) for p in ps] == [bits(np_quantile(x, p)) for p in ps]
    r = ranks[-1]
    assert total.count_below(r) == int((srt < srt[r]).sum())


def test_model_scope_lo_parts_merge_back():
    """lo_part per piece (what each model-scope job does) then merge_lo into the global one."""
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(s, generator=g) * 10 ** -e for s, e in ((1000, 2), (37, 3), (1, 1), (513, 2))]
    G = AbsSelector()
    for p in pieces:
        part = AbsSelector()
        part.add_hi(p)
        G.merge(part)
    ranks = G.quantile_ranks(0.5) + G.quantile_ranks(0.95)
    G.select(ranks)                                  # optional (global_select); lo_part repeats it
    shipped = AbsSelector.from_numpy(G.to_numpy())
    for p in pieces:
        lo = shipped.lo_part(ranks)
        lo.add_lo(p)
        G.merge_lo(AbsSelector.from_numpy(lo.to_numpy()))
    whole = torch.cat(pieces)
    assert [G.quantile(p) for p in (0.5, 0.95)] == [np_quantile(whole, p) for p in (0.5, 0.95)]


def test_unselected_rank_is_an_error():
    s = AbsSelector()
    s.add_hi(torch.arange(100.0))
    s.select([10])
    s.add_lo(torch.arange(100.0))
    assert s.value(10) == 10.0
    with pytest.raises(RuntimeError):
        s.value(90)
    with pytest.raises(IndexError):
        s.select([100])


def test_dense_lo_histogram_path_with_many_selected_values():
    """Heavy ties put far more than a sort's worth of values in the selected buckets."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-3000, 3000, (300_000,), generator=g).float() * 1e-3
    pieces = x.split(70_001)
    s = AbsSelector()
    for p in pieces:
        s.add_hi(p)
    ps = [0.1, 0.5, 0.95, 0.999]
    s.select([r for p in ps for r in s.quantile_ranks(p)])
    for p in reversed(pieces):
        s.add_lo(p)
    assert [bits(s.quantile(p)) for p in ps] == [bits(np_quantile(x, p)) for p in ps]
