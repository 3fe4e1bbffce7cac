"""Mask rows arriving in engine chunks smaller than (and not aligned with) the Zarr mask chunks are
gathered in one reused staging buffer (pipeline.job._Sink): whatever the chunking, the store holds
exactly the masks, and the buffer is not reallocated once it holds a chunk and an engine chunk."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from pipeline.job import _Sink
from pipeline.writers import MaskStore


@pytest.mark.parametrize("shape, mask_rows, cuts", [
    ((37, 5), 8, [3, 7, 9, 16, 22, 30, 37]),     # engine chunks smaller and larger than a mask chunk
    ((37, 5), 8, [8, 16, 24, 32, 37]),           # aligned: written straight through
    ((20,), 6, [1, 2, 3, 11, 13, 20]),           # a 1-D tensor (K x rows masks)
    ((64, 3), 16, [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 64]),
])
def test_chunked_mask_rows_land_whole(tmp_path, shape, mask_rows, cuts):
    k = 3
    want = np.random.default_rng(0).random((k, *shape)) < 0.4
    MaskStore.create(tmp_path / "m.zarr", {"w": (k, shape, mask_rows)}, {"tasks": ["a", "b", "c"]})
    store = MaskStore.open(tmp_path / "m.zarr")
    sink = _Sink(types.SimpleNamespace(mask_store=store), "w", shape[0])
    r0, buffers = 0, set()
    for r1 in cuts:
        sink.masks(r0, r1, torch.from_numpy(want[:, r0:r1].copy()))
        if sink._stage is not None:
            buffers.add(sink._stage.__array_interface__["data"][0])
        r0 = r1
    assert sink._have == 0                     # nothing left behind at the end of the tensor
    assert len(buffers) <= 2                   # grown at most once (the first sizing, then one growth)
    for t in range(k):
        np.testing.assert_array_equal(store.read("w", t), want[t])


def test_sinks_alive_together_keep_their_own_rows(tmp_path):
    """`tadrop tune` feeds one sink per grid point chunk by chunk, in turn: each has its own buffer."""
    k, shape, mask_rows = 2, (30, 4), 8
    rng = np.random.default_rng(1)
    wants = [rng.random((k, *shape)) < 0.5 for _ in range(3)]
    stores, sinks = [], []
    for i in range(3):
        MaskStore.create(tmp_path / f"m{i}.zarr", {"w": (k, shape, mask_rows)}, {"tasks": ["a", "b"]})
        stores.append(MaskStore.open(tmp_path / f"m{i}.zarr"))
        sinks.append(_Sink(types.SimpleNamespace(mask_store=stores[i]), "w", shape[0], slot=i))
    r0 = 0
    for r1 in (5, 11, 19, 30):
        for sink, want in zip(sinks, wants):
            sink.masks(r0, r1, torch.from_numpy(want[:, r0:r1].copy()))
        r0 = r1
    for store, want in zip(stores, wants):
        for t in range(k):
            np.testing.assert_array_equal(store.read("w", t), want[t])
