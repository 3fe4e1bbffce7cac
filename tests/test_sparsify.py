"""The operator Phi (tadrop.sparsify): TADrop, TopK, DARE, Identity (SPEC section 1)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tadrop import DARE, ChunkKey, Identity, NonFiniteError, TADrop, TopK

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = ChunkKey(seed=0, tensor="w", task="t")


def fit_apply(phi, tau, key=KEY, **kw):
    out = tau.clone()
    stats = phi.fit_apply_(out, key, **kw)
    return out, stats


def chunks_of(tau, cuts):
    flat = tau.reshape(-1)
    edges = [0] + sorted(cuts) + [flat.numel()]
    return lambda: (flat[a:b] for a, b in zip(edges, edges[1:]))


# -- TADrop, hand-computed ---------------------------------------------------------------------

TAU = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, 0.0, 0.0, 0.05, -0.6, 1.0])


def test_tadrop_hand_computed():
    # |tau| sorted: 0 0 .05 .1 .2 .3 .4 .5 .6 1
    # Q_.5 = .2 + .5 (.3 - .2) = .25;  Q_.95 = .6 + .55 (1 - .6) = .82 (float32: 0.82000005)
    # d = .25 / .82 = 0.30488,  k = floor(3.0488) = 3,  t = 4th smallest = 0.1: drop 0, 0, .05
    out, st_ = fit_apply(TADrop(), TAU)
    assert st_.q_a == 0.25 and st_.q_b == 0.8200000524520874   # numpy's float32 lerp
    assert st_.drop_rate == pytest.approx(0.3048780292783)
    assert (st_.k, st_.kept, st_.threshold) == (3, 7, float(np.float32(0.1)))
    # ||tau||^2 = 1.9125, ||tau_hat||^2 = 1.91: scale = sqrt(1.9125 / 1.91) = 1.000654236
    assert st_.norm_before == pytest.approx(math.sqrt(1.9125), rel=1e-7)
    assert st_.scale == pytest.approx(1.0006542362536, rel=1e-12)
    want = torch.where(TAU.abs() >= 0.1, TAU, torch.zeros(())) * st_.scale
    assert torch.equal(out, want)
    assert float(out.double().norm()) == pytest.approx(st_.norm_before, rel=1e-6)
    assert st_.norm_after == pytest.approx(st_.norm_before, rel=1e-9)


def test_tadrop_apply_matches_fused_and_rescale_options():
    for rescale in ("norm", "none", "inverse_keep"):
        phi = TADrop(rescale=rescale)
        fused, st_ = fit_apply(phi, TAU)
        st2 = phi.fit(TAU)
        assert st2 == st_
        assert torch.equal(phi.apply(TAU.clone(), st2, KEY), fused)
    _, st_none = fit_apply(TADrop(rescale="none"), TAU)
    assert st_none.scale == 1.0
    out, st_inv = fit_apply(TADrop(rescale="inverse_keep"), TAU)
    assert st_inv.scale == pytest.approx(1 / (1 - st_inv.drop_rate))
    assert out[-1] == pytest.approx(1.0 / (1 - 0.3048780292783), rel=1e-6)


def test_tadrop_ties_at_threshold_are_kept():
    tau = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 2.0, 3.0, 4.0, 10.0])
    out, st_ = fit_apply(TADrop(rescale="none"), tau)
    # Q_.5 = 1, Q_.95 = 4 + .55 * 6 = 7.3: d = .137, k = 1, t = 2nd smallest = 1: nothing dropped
    assert st_.k == 1 and st_.threshold == 1.0 and st_.kept == 10
    assert torch.equal(out, tau)


def test_tadrop_all_zero_stays_zero():
    for rescale in ("norm", "none", "inverse_keep"):
        out, st_ = fit_apply(TADrop(rescale=rescale), torch.zeros(7, 3))
        assert torch.equal(out, torch.zeros(7, 3)) and not torch.signbit(out).any()
        assert st_.norm_before == 0.0 and st_.norm_after == 0.0 and st_.drop_rate == 0.0
        assert not any(isinstance(v, float) and math.isnan(v) for v in vars(st_).values())


def test_tadrop_d_equal_one_drops_everything():
    # all |tau| equal and large: d = Q/(Q + 1e-12) rounds to exactly 1.0 -> k = n, nothing survives
    out, st_ = fit_apply(TADrop(), torch.full((5,), -1e6))
    assert st_.drop_rate == 1.0 and st_.k == 5 and st_.kept == 0
    assert torch.equal(out, torch.zeros(5))


def test_tadrop_model_scope_uses_global_rate():
    tau = torch.arange(1.0, 11.0)
    out, st_ = fit_apply(TADrop(scope="model", rescale="none"), tau, global_value=0.45)
    assert st_.k == 4 and st_.kept == 6 and st_.q_a is None
    assert torch.equal(out, torch.where(tau > 4, tau, torch.zeros(())))


def test_tadrop_nonfinite():
    with pytest.raises(NonFiniteError):
        TADrop().fit(torch.tensor([1.0, float("nan")]))


# -- TADrop properties ---------------------------------------------------------------------------

def tie_free(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(4 * n, generator=g)[:n].float() + 1) * torch.sign(torch.randn(n, generator=g)) * 1e-3


@SETTINGS
@given(n=st.integers(2, 400), seed=st.integers(0, 10**6))
def test_tadrop_drops_exactly_floor_dn_and_keeps_norm(n, seed):
    tau = tie_free(n, seed)
    out, st_ = fit_apply(TADrop(), tau)
    a = np.abs(tau.numpy())
    d = min(max(float(np.quantile(a, 0.5)) / (float(np.quantile(a, 0.95)) + 1e-12), 0.0), 1.0)
    assert st_.drop_rate == d
    assert int((out == 0).sum()) == math.floor(d * n) == st_.k
    assert float(out.double().norm()) == pytest.approx(float(tau.double().norm()), rel=1e-6)


@SETTINGS
@given(shape=st.tuples(st.integers(1, 40), st.integers(1, 30)), seed=st.integers(0, 10**6),
       data=st.data(), ties=st.booleans())
def test_fit_streamed_equals_fit(shape, seed, data, ties):
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(shape, generator=g)
    if ties:
        tau = (tau * 4).round() / 4
    n = tau.numel()
    cuts = data.draw(st.lists(st.integers(0, n), max_size=6))
    for phi in (TADrop(), TADrop(a=0.3, b=0.8, rescale="none"), TopK(0.25)):
        whole = phi.fit(tau)
        assert phi.fit_streamed(chunks_of(tau, cuts), n) == whole     # bit-identical stats


def test_streamed_fit_passes():
    """Each pass calls the factory once: hi + ||tau||^2, lo (quantiles and, usually, the
    threshold's bucket), ||tau_hat||^2; a fourth only when the threshold bucket was missed."""
    calls = []
    tau = torch.randn(10000, generator=torch.Generator().manual_seed(1))

    def chunks():
        calls.append(1)
        return iter(tau.split(999))
    TADrop().fit_streamed(chunks, tau.numel())
    assert len(calls) == 3


# -- TopK ------------------------------------------------------------------------------------------

def test_topk_hand_computed():
    tau = torch.tensor([0.1, -0.9, 0.3, 0.3, -0.3, 0.05, 0.7, 0.0, 0.2, -0.25])
    out, st_ = fit_apply(TopK(0.3), tau)
    # keep floor(.3 * 10) = 3 largest |tau| (.9 .7 and the .3s): the tie at .3 keeps all three
    assert st_.threshold == float(np.float32(0.3)) and st_.kept == 5
    assert torch.equal(out, torch.tensor([0, -0.9, 0.3, 0.3, -0.3, 0, 0.7, 0, 0, 0]))
    assert st_.drop_rate == 0.5


def test_topk_keeps_at_least_one_and_model_threshold():
    tau = torch.tensor([0.1, -0.4, 0.2])
    out, st_ = fit_apply(TopK(0.0), tau)
    assert st_.kept == 1 and torch.equal(out, torch.tensor([0.0, -0.4, 0.0]))
    out, st_ = fit_apply(TopK(scope="model"), tau, global_value=0.15)
    assert st_.kept == 2 and torch.equal(out, torch.tensor([0.0, -0.4, 0.2]))
    out, st_ = fit_apply(TopK(1.0), tau)
    assert st_.kept == 3 and torch.equal(out, tau)


@SETTINGS
@given(n=st.integers(1, 300), density=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_topk_keeps_max1_floor_density_n_on_tie_free_data(n, density, seed):
    tau = tie_free(n, seed)
    out, st_ = fit_apply(TopK(density), tau)
    keep = max(1, math.floor(density * n))
    assert int((out != 0).sum()) == keep == st_.kept
    kept_min = out.abs()[out != 0].min()
    assert bool((tau.abs()[out == 0] < kept_min).all())


# -- DARE --------------------------------------------------------------------------------------------

def dare_out(phi, tau, key, cuts):
    flat = tau.reshape(-1).clone()
    edges = [0] + sorted(cuts) + [flat.numel()]
    order = list(zip(edges, edges[1:]))
    for a, b in reversed(order):                        # any call order
        phi.apply(flat[a:b], phi.fit(flat[a:b]), ChunkKey(key.seed, key.tensor, key.task, key.offset + a))
    return flat


@SETTINGS
@given(n=st.integers(1, 200_000), data=st.data(), p=st.sampled_from([0.1, 0.5, 0.9]))
def test_dare_bits_do_not_depend_on_chunking_or_order(n, data, p):
    tau = torch.randn(n, generator=torch.Generator().manual_seed(n))
    phi = DARE(p)
    key = ChunkKey(seed=7, tensor="layers.0.w", task="math", offset=0)
    whole = dare_out(phi, tau, key, [])
    cuts = data.draw(st.lists(st.integers(0, n), max_size=4))
    assert torch.equal(dare_out(phi, tau, key, cuts), whole)
    kept = whole != 0
    assert torch.equal(whole[kept], tau[kept] / (1 - p))


def test_dare_rate_and_keys():
    tau = torch.ones(1 << 18)
    phi = DARE(0.3)
    key = ChunkKey(seed=1, tensor="w", task="a")
    out = phi.apply(tau.clone(), phi.fit(tau), key)
    assert float((out == 0).float().mean()) == pytest.approx(0.3, abs=0.01)
    assert torch.equal(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))
    for other in (ChunkKey(2, "w", "a"), ChunkKey(1, "v", "a"), ChunkKey(1, "w", "b")):
        assert not torch.equal(phi.apply(tau.clone(), phi.fit(tau), other), out)
    assert torch.equal(DARE(0.3, seed=1).apply(tau.clone(), phi.fit(tau), ChunkKey(99, "w", "a")), out)
    with pytest.raises(ValueError):
        DARE(1.0)


def test_identity_and_flags():
    assert not Identity().needs_fit and not DARE(0.2).needs_fit
    assert TADrop().needs_fit and TopK().needs_fit
    tau = torch.randn(5)
    out, st_ = fit_apply(Identity(), tau)
    assert torch.equal(out, tau) and st_.kept is None and st_.numel == 5
    with pytest.raises(ValueError):
        TADrop(rescale="bogus")
    with pytest.raises(ValueError):
        TopK(scope="global")
