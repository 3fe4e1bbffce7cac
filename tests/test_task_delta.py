"""Sources that hand tau_k over directly (`task_delta`, e.g. LoRA adapters): the engine uses those
rows as the task vector, in every method, sparsifier, chunking and the model-scope passes.

Values are multiples of 2^-10 of small magnitude, so theta_k = theta_0 + tau_k and
theta_k - theta_0 are exact in float32: a delta source and a theta source must then give the
same bits, and a task given as a delta must never be read as theta."""
import pytest
import torch

from tadrop import (DARE, Identity, MemorySink, MemorySource, MergeSpec, TADrop, TensorPlan, TopK,
                    global_pass_hi, global_pass_lo, global_select, global_values, merge_tensor, plan_tensor)
from tadrop.streamed import METHODS

PHIS = [Identity(), TADrop(), TopK(0.3), DARE(0.4), TADrop(scope="model"), TopK(0.2, scope="model")]


def exact_family(shape, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-2000, 2000, shape, generator=g).float() / 1024
    taus = [torch.randint(-300, 300, shape, generator=g).float() / 1024 for _ in range(K)]
    for t in taus:
        t[0] = 0.0                                  # a zero row: ties and exact zeros
    return base, taus


class NoTheta(MemorySource):
    """Tasks given only as deltas: reading theta would be a bug."""

    def task(self, k, r0, r1):
        if self._deltas[k] is not None:
            raise AssertionError(f"task {k} is a delta; the engine read theta")
        return super().task(k, r0, r1)


def gvals(spec, src, plan):
    if not (spec.sparsifier.needs_fit and spec.sparsifier.scope == "model"):
        return None
    sels = global_pass_hi(spec, "w", src, plan)
    global_select(spec, sels)
    for s, p in zip(sels, global_pass_lo(spec, "w", src, plan, sels)):
        s.merge_lo(p)
    return global_values(spec, sels)


def merge(spec, src, plan):
    sink = MemorySink(src.shape, spec.K)
    res = merge_tensor(spec, "w", src, sink, plan, gvals(spec, src, plan))
    return sink, res.to_dict()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("phi", PHIS, ids=repr)
def test_delta_source_equals_theta_source(method, phi):
    K, shape = 3, (12, 5)
    base, taus = exact_family(shape, K)
    thetas = [base + t for t in taus]
    assert all(torch.equal(th - base, t) for th, t in zip(thetas, taus))
    spec = MergeSpec(method, phi, ("a", "b", "c"), weights=(1.0, 0.5, 2.0), seed=5)
    # task b as a delta, a and c as theta: the two kinds mix in one tensor
    mixed = NoTheta(base, [thetas[0], None, thetas[2]], [None, taus[1], None])
    deltas = NoTheta(base, [None] * K, taus)
    plain = MemorySource(base, thetas)
    for plan in (plan_tensor(spec, shape, K, 1 << 40), TensorPlan(5, True, 0), TensorPlan(3, False, 0)):
        want_sink, want = merge(spec, plain, plan)
        for src in (mixed, deltas):
            sink, got = merge(spec, src, plan)
            assert got == want
            for x, y in ((sink.merged_t, want_sink.merged_t), (sink.unified_t, want_sink.unified_t),
                         (sink.masks_t, want_sink.masks_t)):
                assert (x is None and y is None) or torch.equal(x, y)


def test_delta_nonfinite_is_named():
    base, taus = exact_family((4, 4), 1)
    taus[0][2, 1] = float("nan")
    spec = MergeSpec("task_arithmetic", Identity(), ("lora",))
    with pytest.raises(Exception, match="lora"):
        merge(spec, NoTheta(base, [None], taus), TensorPlan(4, True, 0))
