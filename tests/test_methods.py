"""Merge methods on one chunk (tadrop.methods), SPEC section 2."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tadrop import (EMRPartials, consensus, emr, emr_rescalers, emr_task_model, tall_masks, tall_task_model,
                    task_arithmetic, task_sum, ties, ties_vector)
from tadrop.methods import EMRSums

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T = lambda *rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731


# -- hand-computed ------------------------------------------------------------------------------

def test_task_arithmetic_hand_computed():
    base = torch.tensor([1.0, 2.0])
    taus = T([1.0, -1.0], [0.5, 0.5])
    # sum = [1.5, -0.5]; base + 0.5 * sum = [1.75, 1.75]
    assert torch.equal(task_arithmetic(base, taus, 0.5), torch.tensor([1.75, 1.75]))
    assert torch.equal(task_sum(taus), torch.tensor([1.5, -0.5]))


def test_task_arithmetic_sums_in_float64():
    taus = T([1e8, 1.0, -1e8, 1.0])[0].reshape(4, 1)     # float32 left to right: 0 + 1 = 1
    assert float(task_arithmetic(torch.zeros(1), taus, 1.0)) == 2.0


def test_ties_2x3_hand_computed():
    taus = T([2.0, -1.0, 0.5],
             [-1.0, -3.0, -0.5])
    # sums [1, -4, 0] -> elected signs [+, -, +] (a zero sum elects +)
    # disjoint means: [2 (task 0 only), (-1 - 3)/2 = -2 (both), 0.5 (task 0 only)]
    assert torch.equal(ties_vector(taus), torch.tensor([2.0, -2.0, 0.5]))
    base = torch.tensor([10.0, 10.0, 10.0])
    assert torch.equal(ties(base, taus, 0.5), torch.tensor([11.0, 9.0, 10.25]))


def test_ties_zero_where_no_task_agrees():
    taus = T([0.0, 1.0], [0.0, -1.0])        # element 0: all zero; element 1: sum 0 elects +, mean 1
    assert torch.equal(ties_vector(taus), torch.tensor([0.0, 1.0]))


def test_emr_hand_computed_with_lambdas():
    taus = T([1.0, -2.0, 3.0],
             [2.0, 1.0, -1.0])
    # sum [3, -1, 2] -> flag [+1, -1, +1]
    # M_0 = tau_0 * flag > 0 = [T, T, T];  M_1 = [T, F, F]
    # tau_uni = flag * max_k |M_k tau_k| = [2, -2, 3]
    ch = emr(taus)
    assert torch.equal(ch.tau_uni, torch.tensor([2.0, -2.0, 3.0]))
    assert torch.equal(ch.masks, torch.tensor([[True, True, True], [True, False, False]]))
    assert ch.abs_tau_sum.tolist() == [6.0, 4.0]
    assert ch.abs_uni_sum.tolist() == [7.0, 2.0]
    # one tensor: lambda_0 = (6/3) / (7/3) = 6/7, lambda_1 = (4/3) / (2/3) = 2
    lambdas, warns = emr_rescalers([EMRPartials((6.0, 4.0), (7.0, 2.0), 3)])
    assert lambdas == [pytest.approx(6 / 7, rel=1e-15), 2.0] and warns == []
    base = torch.zeros(3)
    assert torch.allclose(emr_task_model(base, ch.tau_uni, ch.masks[0], 6 / 7), torch.tensor([2, -2, 3]) * 6 / 7)
    assert torch.equal(emr_task_model(base, ch.tau_uni, ch.masks[1], 2.0), torch.tensor([4.0, 0.0, 0.0]))


def test_emr_rescalers_official_vs_global_and_zero_denominator():
    a = EMRPartials((6.0, 1.0), (3.0, 0.0), 3)        # means: 2, 1/3 and 1, 0
    b = EMRPartials((2.0, 0.0), (4.0, 0.0), 1)        # means: 2, 0   and 4, 0
    lam, warns = emr_rescalers([a, b], "official", ["x", "y"])
    assert lam[0] == pytest.approx((2 + 2) / (1 + 4)) and lam[1] == 0.0
    assert len(warns) == 1 and "'y'" in warns[0]
    lam, _ = emr_rescalers([b, a], "global", ["x", "y"])
    assert lam[0] == pytest.approx(8 / 7)
    with pytest.raises(ValueError):
        emr_rescalers([a], "bogus")
    assert EMRPartials.from_dict(a.to_dict()) == a


def test_emr_zero_sum_flag_minus_one_and_zeros_never_masked():
    taus = T([1.0, 0.0], [-1.0, 0.0])               # both sums are 0 -> flag -1
    ch = emr(taus)
    assert torch.equal(ch.masks, torch.tensor([[False, False], [True, False]]))
    assert torch.equal(ch.tau_uni, torch.tensor([-1.0, 0.0]))
    assert ch.tau_uni[1] == 0


def test_tall_masks_hand_computed_and_strict():
    taus = T([1.0, 0.1],
             [0.2, 2.0])
    mtl = task_sum(taus)                                   # [1.2, 2.1]
    # m_0: 1 > .4*.2 ; .1 > .4*2.0 no.  m_1: .2 > .4*1.0 no ; 2 > .4*.1
    m = tall_masks(taus, mtl, [0.4, 0.4])
    assert torch.equal(m, torch.tensor([[True, False], [False, True]]))
    # strict: |tau| == lambda |mtl - tau| is not kept
    eq = tall_masks(T([1.0], [1.0]), torch.tensor([3.0]), [0.5, 0.25])
    assert eq.tolist() == [[False], [True]]             # 1 > .5*2 no; 1 > .25*2 yes
    base = torch.tensor([5.0, 5.0])
    assert torch.equal(tall_task_model(base, mtl, m[1]), torch.tensor([5.0, 7.1]))


def test_consensus_hand_computed():
    masks = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    base = torch.tensor([1.0, 1.0, 1.0])
    mtl = torch.tensor([2.0, 4.0, 8.0])
    # votes [3, 2, 1] >= 2 -> [T, T, F]: base + .5 * mtl where kept
    assert torch.equal(consensus(base, mtl, masks, 2, 0.5), torch.tensor([2.0, 3.0, 1.0]))
    assert torch.equal(consensus(base, mtl, masks, 4, 0.5), base)


def test_out_buffers_and_shapes():
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 4, 5, generator=g)
    base = torch.randn(4, 5, generator=g)
    out = torch.empty(4, 5)
    assert task_arithmetic(base, taus, 0.3, out=out) is out
    assert ties(base, taus, 1.0).shape == (4, 5)
    ch = emr(taus)
    assert ch.tau_uni.shape == (4, 5) and ch.masks.shape == (3, 4, 5)
    assert tall_masks(taus, task_sum(taus), [0.4] * 3).shape == (3, 4, 5)


# -- properties -----------------------------------------------------------------------------------

small = st.one_of(st.integers(-3, 3).map(float), st.floats(-4, 4, width=32), st.just(-0.0))


@st.composite
def task_stacks(draw):
    K = draw(st.integers(1, 5))
    n = draw(st.integers(1, 30))
    vals = draw(st.lists(small, min_size=K * n, max_size=K * n))
    return torch.tensor(vals, dtype=torch.float32).reshape(K, n)


@SETTINGS
@given(taus=task_stacks())
def test_emr_masks_only_where_sign_agrees_with_election(taus):
    ch = emr(taus)
    S = taus.double().sum(0)
    flag = torch.where(S > 0, 1.0, -1.0)
    expect = (taus.double() * flag) > 0
    assert torch.equal(ch.masks, expect)
    assert not (ch.masks & (taus == 0)).any()
    # tau_uni: elected sign, magnitude of the largest agreeing entry
    mag = (taus.abs() * ch.masks).amax(0)
    assert torch.equal(ch.tau_uni, (flag * mag).float())
    assert torch.equal(ch.abs_tau_sum, taus.double().abs().sum(1))
    assert torch.allclose(ch.abs_uni_sum, (ch.masks.double() * mag.double()).sum(1), rtol=1e-12)


@SETTINGS
@given(taus=task_stacks())
def test_ties_is_the_disjoint_mean(taus):
    got = ties_vector(taus)
    K, n = taus.shape
    for j in range(n):
        col = [float(v) for v in taus[:, j]]
        s = 1.0 if sum(col) >= 0 else -1.0                 # exact for these small values
        agree = [v for v in col if v != 0 and (v > 0) == (s > 0)]
        want = sum(agree) / len(agree) if agree else 0.0
        assert float(got[j]) == pytest.approx(want, rel=1e-6, abs=0)


@SETTINGS
@given(taus=task_stacks(), lam=st.floats(0, 2))
def test_task_arithmetic_is_the_float64_sum(taus, lam):
    base = torch.linspace(-1, 1, taus.shape[1])
    want = (base.double() + lam * taus.double().sum(0)).float()
    assert torch.equal(task_arithmetic(base, taus, lam), want)


@SETTINGS
@given(taus=task_stacks(), data=st.data())
def test_emr_sums_do_not_depend_on_chunking(taus, data):
    K, n = taus.shape
    cut = data.draw(st.integers(0, n))
    acc = EMRSums(K, "cpu")
    uni = torch.cat([emr(taus[:, :cut], sums=acc).tau_uni, emr(taus[:, cut:], sums=acc).tau_uni])
    whole = emr(taus)
    assert torch.equal(uni, whole.tau_uni)
    p = acc.partials(n)
    assert p.abs_tau_sum == tuple(whole.abs_tau_sum.tolist())
    assert p.abs_uni_sum == tuple(whole.abs_uni_sum.tolist())
