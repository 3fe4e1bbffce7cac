"""Off the CPU the float64 sums convert 2^24-element batches and fetch their block sums once per
tensor (a GPU pays per kernel launch and per sync, not per cache miss): the same bits as the CPU's
cache-sized batches. Checked here on CPU tensors with the device batching forced on, the native
kernels off (they would take these sums otherwise) and a batch small enough to leave ragged ends."""
import pytest
import torch

from tadrop import _buffers, native, select
from tadrop import MemorySink, MemorySource, MergeSpec, TADrop, TopK, merge_tensor, plan_tensor
from tadrop.streamed import METHODS

from test_streamed import family, names, same_bits


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    monkeypatch.setenv(select.ENV, "radix")    # the process may have calibrated to native counting


def device_batching(monkeypatch, elements: int) -> None:
    monkeypatch.setattr(_buffers, "_on_cpu", lambda device: False)
    monkeypatch.setattr(_buffers, "_DEVICE_BATCH_ELEMENTS", elements)


def sums(x: torch.Tensor, K: int, t: float):
    s = _buffers.Sum64(x.device, "abs")
    s.add(x[: x.numel() // 3])
    s.add(x[x.numel() // 3:])
    rows = _buffers.Sum64Rows(K, x.device, "abs")
    xs = x[: (x.numel() // K) * K].view(K, -1)
    rows.add(xs[:, :777])
    rows.add(xs[:, 777:])
    m = torch.empty(xs.shape[1], dtype=torch.float64)
    _buffers.sum_tasks64(xs, m)
    f = torch.ones(xs.shape[1], dtype=torch.float64)
    _buffers.f64_inplace(f, xs[0], "mul")
    return (s.value(), [rows.value(k) for k in range(K)], _buffers.sumsq64_pair(x, t), m, f)


@pytest.mark.parametrize("elements", [3 * _buffers.SUM_BLOCK, 1 << 24])
def test_sums_same_bits_with_device_batches(torch_path, monkeypatch, elements):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5 * 4096 * 7 + 123, generator=g) * torch.rand(1, generator=g)
    want = sums(x, 5, 0.3)
    device_batching(monkeypatch, elements)
    got = sums(x, 5, 0.3)
    assert want[:3] == got[:3]
    assert torch.equal(want[3], got[3]) and torch.equal(want[4], got[4])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("phi", [TADrop(), TopK(0.3)], ids=["tadrop", "topk"])
def test_merge_same_bits_with_device_batches(torch_path, monkeypatch, method, phi):
    base, tasks = family((97, 413), 3, torch.bfloat16, seed=4)
    spec = MergeSpec(method, phi, names(3))

    def run():
        sink = MemorySink(base.shape, 3)
        res = merge_tensor(spec, "w", MemorySource(base, tasks), sink, plan_tensor(spec, base.shape, 3, 1 << 30))
        return sink, res

    a, ra = run()
    device_batching(monkeypatch, 5 * _buffers.SUM_BLOCK)
    b, rb = run()
    for x, y in ((a.merged_t, b.merged_t), (a.unified_t, b.unified_t), (a.masks_t, b.masks_t)):
        assert same_bits(x, y)
    assert ra.to_dict() == rb.to_dict()
