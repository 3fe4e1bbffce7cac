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
    for plan in (plan_tensor(spec, shape, K, 1 << 40), TensorPlan(5, True, 0), TensorPlan(3, False, 0),
                 TensorPlan(5, True, 0, base_whole=True)):
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


# -- tasks known to be zero (an adapter that does not touch the tensor) ------------------------------

class KnownZero(MemorySource):
    """Tasks in `zero` are announced by `task_zero`: the engine must neither read them nor need their
    base rows; counts the base reads."""

    def __init__(self, base, tasks, deltas, zero):
        super().__init__(base, tasks, deltas)
        self.zero, self.base_reads = set(zero), 0

    def task_zero(self, k):
        return k in self.zero

    def task(self, k, r0, r1):
        assert self._deltas[k] is None, f"task {k} is a delta; the engine read theta"
        return super().task(k, r0, r1)

    def task_delta(self, k, r0, r1, out=None):
        assert k not in self.zero, f"task {k} is known zero; the engine read it"
        return super().task_delta(k, r0, r1, out=out)

    def base(self, r0, r1):
        self.base_reads += 1
        return super().base(r0, r1)


def bits(t):
    return None if t is None else (t.view(torch.int32) if t.dtype == torch.float32 else t)


SPECS = [dict(sparsifier=phi) for phi in PHIS] + [
    dict(sparsifier=TADrop(), task_sparsifiers=(TADrop(), TADrop(a=0.3), TADrop(), TADrop(a=0.3))),
    dict(sparsifier=TopK(0.3), task_sparsifiers=(TopK(0.3), TopK(0.5), TopK(0.3), TopK(0.1))),
    dict(sparsifier=TADrop(), emr_tadrop="mask"),
    # zero tasks b and d with Phis whose fits of zeros differ (rescale factor 1 vs 0): never shared
    dict(sparsifier=TADrop(), emr_tadrop="mask",
         task_sparsifiers=(TADrop(), TADrop(rescale="inverse_keep"), TADrop(), TADrop()))]


ZERO_CASES = [(m, kw) for kw in SPECS for m in METHODS if m == "emr" or not kw.get("emr_tadrop")]


@pytest.mark.parametrize("method,kw", ZERO_CASES, ids=lambda v: v if isinstance(v, str) else repr(v)[:60])
def test_known_zero_tasks_give_the_bits_of_zero_deltas(method, kw):
    """A zero task the source announces is filled with zeros and fitted once per distinct Phi: the
    outputs, stats and EMR partials are those of the same task handed over as zero rows
    (`emr_tadrop` only exists for EMR)."""
    K, shape = 4, (12, 5)
    base, taus = exact_family(shape, K, seed=3)
    zeros = [torch.zeros(shape) for _ in range(K)]
    deltas = [taus[0], zeros[1], taus[2], zeros[3]]
    spec = MergeSpec(method, task_names=("a", "b", "c", "d"), weights=(1.0, 0.5, 2.0, 1.0), seed=5, **kw)
    for plan in (plan_tensor(spec, shape, K, 1 << 40), TensorPlan(5, True, 0), TensorPlan(3, False, 0),
                 TensorPlan(5, True, 0, base_whole=True)):
        want_sink, want = merge(spec, MemorySource(base, [None] * K, deltas), plan)
        src = KnownZero(base, [None] * K, deltas, zero={1, 3})
        sink, got = merge(spec, src, plan)
        assert got == want
        for x, y in ((sink.merged_t, want_sink.merged_t), (sink.unified_t, want_sink.unified_t),
                     (sink.masks_t, want_sink.masks_t)):
            assert (x is None and y is None) or torch.equal(bits(x), bits(y))


@pytest.mark.parametrize("plan", [TensorPlan(12, True, 0), TensorPlan(5, True, 0), TensorPlan(3, False, 0)],
                         ids=["whole", "fit_whole", "streamed"])
@pytest.mark.parametrize("phi", [TADrop(), TopK(0.3), TADrop(scope="model")], ids=repr)
def test_tasks_given_as_tau_read_the_base_once(plan, phi):
    """The fit passes need no base rows for a delta or zero task: the base is read once per chunk of
    the combine (and not at all by the model-scope passes)."""
    K, shape = 3, (12, 5)
    base, taus = exact_family(shape, K, seed=4)
    spec = MergeSpec("emr", phi, ("a", "b", "c"))
    src = KnownZero(base, [None] * K, [taus[0], taus[1], torch.zeros(shape)], zero={2})
    gv = gvals(spec, src, plan)
    assert src.base_reads == 0
    merge_tensor(spec, "w", src, MemorySink(shape, K), plan, gv)
    assert src.base_reads == -(-shape[0] // plan.chunk_rows)


@pytest.mark.parametrize("plan", [TensorPlan(12, True, 0), TensorPlan(3, True, 0), TensorPlan(3, False, 0)])
def test_nonfinite_base_is_named_when_every_task_is_a_delta(plan):
    """The fit passes no longer read the base for delta tasks; the combine's read still checks it."""
    base, taus = exact_family((12, 5), 2)
    base[7, 3] = float("inf")
    spec = MergeSpec("emr", TADrop(), ("a", "b"))
    with pytest.raises(Exception, match="base model"):
        merge(spec, KnownZero(base, [None, None], [taus[0], None], zero={1}), plan)
