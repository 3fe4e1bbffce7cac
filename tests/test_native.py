"""The C kernels (tadrop/_native.c) against the torch path they replace: the same bits.

TADROP_NATIVE=0 turns the kernels off in-process (tadrop.native.lib reads it at each call), so
every case runs both paths on the same input and compares the raw bits (-0.0 included).
"""
import math

import pytest
import torch

from tadrop import methods as M
from tadrop import native
from tadrop._buffers import SUM_BLOCK, Sum64, Sum64Rows, sumsq64, sumsq64_pair

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="the native kernels are not built on this install")


def both(monkeypatch, fn):
    """(fn() with the C kernels, fn() with the torch path)."""
    monkeypatch.setenv(native.ENV, "1")
    fast = fn()
    monkeypatch.setenv(native.ENV, "0")
    slow = fn()
    monkeypatch.delenv(native.ENV)
    return fast, slow


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def task_rows(K, m, seed, pad=37):
    """float32 [K, m] rows with a row stride != m, exact zeros, -0.0 and sums that cancel."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(K, m + pad, generator=g) * 1e-3
    t[:, ::5] = 0.0
    t[:, 1::7] = -0.0
    if K > 1:
        t[0, 3::11] = -t[1, 3::11]            # sum_k exactly zero where K = 2 (flag -1)
    t[:, 2::13] = t[:, 2::13].bfloat16().float()   # bf16 values: ties between tasks
    return t[:, pad:]


@pytest.mark.parametrize("K", [1, 2, 4, 7])
@pytest.mark.parametrize("with_keep", [False, True])
def test_emr_block_same_bits_as_torch(monkeypatch, K, with_keep):
    m = 3 * 4096 + 555
    t = task_rows(K, m, seed=K)
    keep = (torch.rand(K, m, generator=torch.Generator().manual_seed(9)) < 0.7) if with_keep else None
    fast, slow = both(monkeypatch, lambda: M.emr(t, keep=keep))
    assert torch.equal(fast.masks, slow.masks)
    assert torch.equal(bits(fast.tau_uni), bits(slow.tau_uni))
    assert torch.equal(fast.abs_tau_sum, slow.abs_tau_sum)
    assert torch.equal(fast.abs_uni_sum, slow.abs_uni_sum)
    # and the values are EMR's (SPEC 2), whichever path ran
    S = t.double().sum(0)
    flag = torch.where(S > 0, 1.0, -1.0).float()
    Mk = (t * flag > 0) if keep is None else (t * flag > 0) & keep
    assert torch.equal(fast.masks, Mk)
    assert torch.equal(fast.tau_uni, flag * (t.abs() * Mk).amax(0))


@pytest.mark.parametrize("K", [1, 3, 4])
def test_emr_block_pre_apply_and_counts_same_bits(monkeypatch, K):
    """The kernel's fused Phi apply + weights (`pre`) and mask counts against the torch twin
    (methods.apply_elementwise, then EMR, then _bools.mask_counts): no shrink, a shrink, all
    dropped, rescales, negative weights; -0.0 and zeros in the input."""
    import numpy as np
    from tadrop import _bools as B
    m = 2 * 4096 + 999
    t = task_rows(K, m, seed=20 + K)
    lam = [-1.0, float(t[min(1, K - 1)].abs().median()), math.inf, 0.0][:K] if K > 1 else [1e-4]
    pre = np.array([lam, [1.0, 1.7, 1.0, 0.9][:K], [1.0, -2.0, 0.5, -1.0][:K]], dtype=np.float32)

    def run():
        x = t.clone()
        out = M.emr(x, pre=pre, counts=True)
        return x, out
    (xf, fast), (xs, slow) = both(monkeypatch, run)
    assert torch.equal(bits(xf), bits(xs))              # the applied task rows, in place
    assert torch.equal(fast.masks, slow.masks)
    assert torch.equal(bits(fast.tau_uni), bits(slow.tau_uni))
    assert torch.equal(fast.abs_tau_sum, slow.abs_tau_sum)
    assert torch.equal(fast.abs_uni_sum, slow.abs_uni_sum)
    assert fast.counts == slow.counts == B.mask_counts(fast.masks)
    # and what was applied is Phi's apply then the weight, element by element
    ref = t.clone()
    for k in range(K):
        r = torch.where(ref[k].abs() <= float(pre[0][k]), torch.zeros(()), ref[k])
        ref[k] = r * float(pre[1][k]) * float(pre[2][k])
    assert torch.equal(bits(xf), bits(ref))


@pytest.mark.parametrize("cuts", [[], [100], [4095, 1, 4096 * 2 + 7], [5000, 3, 4096]])
def test_emr_streamed_rescaler_sums_same_bits(monkeypatch, cuts):
    """The kernel takes the rescaler sums of the whole blocks after a chunk's head in its own pass;
    fed chunk by chunk (heads that complete a partial block, chunks smaller than a block), the
    totals are the torch path's bits, and the one-shot EMR's."""
    K, m = 3, 4 * SUM_BLOCK + 321
    t = task_rows(K, m, seed=11)

    def run():
        acc, i = M.EMRSums(K, "cpu"), 0
        for c in cuts + [m]:
            j = min(m, i + c)
            if j > i:
                M.emr(t[:, i:j], sums=acc)
            i = j
        p = acc.partials(m)
        return p.abs_tau_sum, p.abs_uni_sum
    fast, slow = both(monkeypatch, run)
    assert fast == slow
    whole = M.emr(t)
    assert fast == (tuple(whole.abs_tau_sum.tolist()), tuple(whole.abs_uni_sum.tolist()))
    assert native.SUM_BLOCK == SUM_BLOCK


@pytest.mark.parametrize("op", ["sum", "abs", "square"])
@pytest.mark.parametrize("cuts", [[], [1], [4095, 1, 4096 * 2 + 7], [5000, 3]])
def test_sum64_same_bits_as_torch(monkeypatch, op, cuts):
    x = task_rows(1, 5 * SUM_BLOCK + 123, seed=3)[0].contiguous()

    def run():
        s, i = Sum64("cpu", op), 0
        for c in cuts + [x.numel()]:
            s.add(x[i:i + c])
            i = min(x.numel(), i + c)
        return s.value()
    fast, slow = both(monkeypatch, run)
    assert fast == slow
    exact = math.fsum(abs(v) if op == "abs" else v * v if op == "square" else v
                      for v in x.double().tolist())
    assert fast == pytest.approx(exact, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("op", ["sum", "abs"])
def test_sum64rows_same_bits_as_torch(monkeypatch, op):
    x = task_rows(3, 4 * SUM_BLOCK + 77, seed=4)

    def run():
        s = Sum64Rows(3, "cpu", op)
        for a, b in [(0, 100), (100, 9000), (9000, x.shape[1])]:
            s.add(x[:, a:b])
        return [s.value(k) for k in range(3)]
    fast, slow = both(monkeypatch, run)
    assert fast == slow


@pytest.mark.parametrize("q", [0.0, 0.3, 0.9])
def test_sumsq64_pair_same_bits_as_torch(monkeypatch, q):
    x = task_rows(1, 3 * SUM_BLOCK + 41, seed=5)[0].contiguous()
    t = float(x.abs().quantile(q)) if q else None
    fast, slow = both(monkeypatch, lambda: sumsq64_pair(x, t))
    assert fast == slow
    assert fast[0] == sumsq64(x)


@pytest.mark.parametrize("K", [1, 2, 4, 7])
@pytest.mark.parametrize("lam", [1.0, 0.37])
def test_ties_block_same_bits_as_torch(monkeypatch, K, lam):
    m = 2 * 4096 + 999
    t = task_rows(K, m, seed=10 + K)
    g = torch.Generator().manual_seed(K)
    base = torch.randn(m, generator=g) * 0.02
    base[::9] = -0.0                                   # -0.0 + a zero update: the sign of zero shows
    base[1::9] = 0.0
    fast, slow = both(monkeypatch, lambda: M.ties(base, t, lam))
    assert torch.equal(bits(fast), bits(slow))
    # and the value is TIES' (SPEC 2)
    S = t.double().sum(0)
    s = torch.where(S >= 0, 1.0, -1.0).double()
    agree = (t.double() * s > 0)
    mean = (t.double() * agree).sum(0) / agree.sum(0).clamp(min=1)   # signed: the elected sign
    assert torch.allclose(fast.double(), base.double() + lam * mean, rtol=0, atol=1e-7)


@pytest.mark.parametrize("K", [1, 3, 4, 32])
def test_mask_counts_same_as_numpy(monkeypatch, K):
    from pipeline.storage import mask_counts
    g = torch.Generator().manual_seed(K)
    masks = (torch.rand(K, 3, 70_001, generator=g) < torch.linspace(0.05, 0.95, K).view(K, 1, 1)).numpy()
    fast, slow = both(monkeypatch, lambda: mask_counts(masks))
    assert fast == slow
    assert fast["kept"] == [int(masks[k].sum()) for k in range(K)]
    assert sum(fast["hist"]) == fast["numel"] == 3 * 70_001


@pytest.mark.parametrize("rescale", ["norm", "none", "inverse_keep"])
@pytest.mark.parametrize("zeros", [0.0, 0.5])
def test_tadrop_apply_same_bits_as_torch(monkeypatch, rescale, zeros):
    from tadrop import TADrop
    from tadrop.sparsify import ChunkKey
    x = task_rows(1, 50_003, seed=int(zeros * 10) + len(rescale))[0].contiguous()
    x[torch.rand(x.numel(), generator=torch.Generator().manual_seed(1)) < zeros] = 0.0
    phi = TADrop(rescale=rescale)
    st = phi.fit(x)

    def run():
        t = x.clone()
        return bits(phi.apply(t, st, ChunkKey()))
    fast, slow = both(monkeypatch, run)
    assert torch.equal(fast, slow)


def test_abs_selector_same_answers_as_torch(monkeypatch):
    """The radix selector (row chunks, model scope) counts with the C kernels where they run."""
    from tadrop import AbsSelector, NonFiniteError
    x = task_rows(1, 300_007, seed=21)[0].contiguous()
    x[::3] = 0.0
    pieces = [x[:100_000], x[100_000:250_000], x[250_000:]]
    n = x.numel()
    ranks = [0, 5, n // 3, n // 2, n - n // 5, n - 1]

    def run():
        s = AbsSelector()
        for p in pieces:
            s.add_hi(p)
        s.select(ranks)
        for p in pieces:
            s.add_lo(p)
        return s._hi.clone(), [(s.value(r), s.count_below(r)) for r in ranks]
    (h1, a1), (h2, a2) = both(monkeypatch, run)
    assert torch.equal(h1, h2) and a1 == a2
    srt = x.abs().sort().values
    assert [v for v, _ in a1] == [float(srt[r]) for r in ranks]
    bad = x.clone()
    bad[77] = math.inf
    with pytest.raises(NonFiniteError):
        AbsSelector().add_hi(bad)
