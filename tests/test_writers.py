"""Shard files written in place by several processes, the index, Zarr masks, Parquet stats."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.checkpoints import TORCH_TO_ST, Checkpoint
from pipeline.writers import (STATS_SCHEMA, MaskStore, MaskStoreError, ShardWriter, atomic_write_json, create_shard_files,
                              decode_array_name, encode_array_name, plan_shards, write_index, write_stats)


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(48, 16, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g).half(),
        "model.layers.1.mlp.up_proj.weight": torch.randn(48, 16, generator=g),
        "model.norm.weight": torch.randn(16, generator=g),
        "position_ids": torch.arange(7),
        "flag": torch.tensor(True),
        "scale": torch.tensor(0.5, dtype=torch.float64),
        "lm_head.weight": torch.randn(64, 16, generator=g).bfloat16(),
        "conv.weight": torch.randn(4, 3, 2, 2, generator=g),
    }


def entries(sd: dict) -> list:
    return [(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in sd.items()]


def load_like_transformers(d: Path) -> dict[str, torch.Tensor]:
    """What transformers does with a sharded checkpoint: read the index, open every shard it names."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out, total = {}, 0
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(d / f), "pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            for k in sf.keys():
                assert index["weight_map"][k] == f
                out[k] = sf.get_tensor(k)
                total += out[k].numel() * out[k].element_size()
    assert set(out) == set(index["weight_map"]) and index["metadata"]["total_size"] == total
    return out


def test_plan_greedy_in_order():
    sd = tensors()
    plan = plan_shards(entries(sd), shard_size=4096)
    sizes = {n: t.numel() * t.element_size() for n, t in sd.items()}
    assert plan.total_size == sum(sizes.values())
    n = len(plan.shards)
    assert plan.files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    order = [name for s in plan.shards for name in s.tensors]
    assert order == list(sd)                                      # greedy, in the given order
    for s in plan.shards:
        used = sum(t.nbytes for t in s.tensors.values())
        assert used <= 4096 or len(s.tensors) == 1                 # only a lone big tensor may exceed
        assert len(s.header) % 8 == 0 and s.file_size == len(s.header) + used
        for t in s.tensors.values():
            assert t.offset % max(1, t.nbytes // max(1, int(np.prod(t.shape)))) == 0   # aligned
    # the next tensor did not fit into the previous shard
    for a, b in zip(plan.shards, plan.shards[1:]):
        first = next(iter(b.tensors.values()))
        assert sum(t.nbytes for t in a.tensors.values()) + first.nbytes > 4096
    assert plan_shards(entries(sd), 4096) == plan
    assert plan.weight_map == dict(sorted(plan.weight_map.items()))


def test_plan_big_tensor_gets_its_own_shard():
    plan = plan_shards([("a", "F32", (2,)), ("big", "F32", (100,)), ("c", "F32", (2,))], 64)
    assert [list(s.tensors) for s in plan.shards] == [["a"], ["big"], ["c"]]
    plan = plan_shards([("a", "F32", (2,)), ("b", "F32", (2,))], 10**9, prefix="unified")
    assert plan.files == ["unified-00001-of-00001.safetensors"] and plan.index_name.startswith("unified")


def test_plan_refuses_bad_entries():
    with pytest.raises(ValueError, match="unknown dtype"):
        plan_shards([("a", "F99", (2,))], 64)
    with pytest.raises(ValueError, match="twice"):
        plan_shards([("a", "F32", (2,)), ("a", "F32", (2,))], 64)


def test_shards_match_safetensors_headers(tmp_path):
    sd = tensors()
    plan = plan_shards(entries(sd), 3000)
    create_shard_files(plan, tmp_path)
    with ShardWriter(plan, tmp_path) as w:
        for n, t in sd.items():
            w.write(n, t.contiguous())
        w.sync()
    write_index(plan, tmp_path)
    got = load_like_transformers(tmp_path)
    for n, t in sd.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    for s in plan.shards:   # safetensors' own full-file loader accepts our layout
        assert set(load_file(str(tmp_path / s.filename))) == set(s.tensors)
    ck = Checkpoint.open(tmp_path, "out")   # and so does our reader
    assert all(torch.equal(ck.view(n), t) for n, t in sd.items())


def _write_rows(args) -> int:
    """A worker: writes every `stride`-th row block of every tensor (disjoint ranges of shared files)."""
    plan, directory, sd, worker, stride, block = args
    writer = ShardWriter(plan, directory)
    for n, t in sd.items():
        rows = t.shape[0] if t.dim() else 1
        for bi, r0 in enumerate(range(0, rows, block)):
            if bi % stride == worker:
                part = t.reshape(1) if t.dim() == 0 else t[r0:r0 + block]
                writer.write(n, part.contiguous(), row_start=r0)
    writer.sync()
    writer.close()
    return os.getpid()


def test_several_processes_write_one_file(tmp_path):
    sd = tensors()
    plan = plan_shards(entries(sd), 10**9)     # everything in one file: maximal sharing
    create_shard_files(plan, tmp_path)
    with mp.get_context("spawn").Pool(3) as pool:
        pids = pool.map(_write_rows, [(plan, tmp_path, sd, w, 3, 5) for w in range(3)])
    assert len(set(pids)) > 1
    write_index(plan, tmp_path)
    got = load_like_transformers(tmp_path)
    for n, t in sd.items():
        assert torch.equal(got[n], t), n


def test_create_is_idempotent_and_keeps_finished_bytes(tmp_path):
    sd = tensors()
    plan = plan_shards(entries(sd), 3000)
    create_shard_files(plan, tmp_path)
    f0 = tmp_path / plan.files[0]
    assert os.stat(f0).st_size == plan.shards[0].file_size
    with ShardWriter(plan, tmp_path) as w:
        for n, t in sd.items():
            w.write(n, t.contiguous())
    create_shard_files(plan, tmp_path)                # resumed run: nothing lost
    assert all(torch.equal(load_like_transformers_noindex(tmp_path, plan)[n], t) for n, t in sd.items())
    f0.write_bytes(b"garbage")                        # a wrong file is recreated
    create_shard_files(plan, tmp_path)
    assert f0.read_bytes()[:len(plan.shards[0].header)] == plan.shards[0].header
    assert os.stat(f0).st_size == plan.shards[0].file_size


def load_like_transformers_noindex(d: Path, plan) -> dict:
    out = {}
    for f in plan.files:
        out.update(load_file(str(d / f)))
    return out


def test_writer_checks(tmp_path):
    plan = plan_shards([("w", "BF16", (4, 3)), ("v", "F32", (5,))], 10**6)
    create_shard_files(plan, tmp_path)
    w = ShardWriter(plan, tmp_path)
    with pytest.raises(TypeError, match="cast"):
        w.write("w", torch.zeros(4, 3))
    with pytest.raises(ValueError, match="overruns"):
        w.write("w", torch.zeros(2, 3, dtype=torch.bfloat16), row_start=3)
    with pytest.raises(ValueError, match="rows of shape"):
        w.write("w", torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        w.write("w", torch.zeros(3, 4, dtype=torch.bfloat16).t())
    with pytest.raises(KeyError):
        w.write("nope", torch.zeros(1))
    w.write("v", torch.arange(2, dtype=torch.float32), row_start=3)
    w.write("w", torch.arange(6).to(torch.bfloat16), row_start=2)     # whole rows, flat
    w.sync()
    w.close()
    got = load_file(str(tmp_path / plan.files[0]))
    assert got["v"].tolist() == [0, 0, 0, 0, 1]
    assert got["w"][2:].flatten().tolist() == list(range(6)) and not got["w"][:2].any()


def test_index_is_atomic_json(tmp_path):
    plan = plan_shards([("b", "F32", (2,)), ("a", "F32", (2,))], 8)
    path = write_index(plan, tmp_path)
    data = json.loads(path.read_text())
    assert data == {"metadata": {"total_size": 16}, "weight_map": {
        "a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}
    assert os.listdir(tmp_path) == ["model.safetensors.index.json"]


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": [1, 2]})
    atomic_write_json(tmp_path / "x.json", {"a": 3})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 3}
    assert os.listdir(tmp_path) == ["x.json"]
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "y.json", {"a": float("nan")})


# -- masks ------------------------------------------------------------------------------------------------

def test_mask_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"model.layers.0.mlp.up_proj.weight": ((10, 6), 4), "model.norm.weight": ((13,), 5),
              "scalar": ((1,), 1)}
    store = MaskStore.create(tmp_path / "m.zarr", {n: (3, s, c) for n, (s, c) in shapes.items()},
                             {"tasks": ["a", "b", "c"]})
    want = {n: rng.random((3, *s)) < 0.5 for n, (s, _) in shapes.items()}
    for n, (s, c) in shapes.items():
        for r0 in range(0, s[0], c):
            store.write(n, r0, want[n][:, r0:r0 + c])
    again = MaskStore.open(tmp_path / "m.zarr")
    assert again.names() == sorted(shapes) and again.attrs == {"tasks": ["a", "b", "c"]}
    for n in shapes:
        for k in range(3):
            assert np.array_equal(again.read(n, k), want[n][k])
        assert np.array_equal(again.read(n, 2, 4, 8), want[n][2, 4:8])
    assert sorted(os.listdir(tmp_path / "m.zarr")) == sorted([*shapes, "zarr.json"])  # dotted names kept


def test_masks_are_bit_packed(tmp_path):
    rows, cols = 64, 512                         # one chunk = 32768 bits = 4096 bytes packed
    store = MaskStore.create(tmp_path / "m.zarr", {"w": (2, (rows, cols), rows)}, {})
    store.write("w", 0, np.random.default_rng(1).random((2, rows, cols)) < 0.5)   # incompressible
    chunk = tmp_path / "m.zarr" / "w" / "c" / "0" / "0" / "0"
    size = chunk.stat().st_size
    assert rows * cols / 8 <= size < rows * cols / 8 * 1.05, size
    meta = json.loads((tmp_path / "m.zarr" / "w" / "zarr.json").read_text())
    names = [c["name"] for c in meta["codecs"]]
    assert "sharding_indexed" not in names and any("packbits" in n for n in names) and "zstd" in names
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, rows, cols]


def test_mask_create_is_idempotent(tmp_path):
    arrays = {"w": (2, (8, 4), 4)}
    store = MaskStore.create(tmp_path / "m.zarr", arrays, {"tasks": ["a", "b"]})
    m = np.ones((2, 4, 4), bool)
    store.write("w", 4, m)
    store = MaskStore.create(tmp_path / "m.zarr", {**arrays, "v": (2, (3,), 3)}, {"tasks": ["a", "b"]})
    assert store.read("w", 1, 4, 8).all()
    with pytest.raises(MaskStoreError, match="chunk missing"):   # never written: not read as False
        store.read("w", 1, 0, 4)
    assert store.names() == ["v", "w"]
    store = MaskStore.create(tmp_path / "m.zarr", {"w": (2, (8, 4), 2)}, {})   # new layout: recreated
    assert store.chunk_rows("w") == 2
    with pytest.raises(MaskStoreError, match="chunk missing"):
        store.read("w", 0)


def test_mask_writes_must_be_whole_chunks(tmp_path):
    store = MaskStore.create(tmp_path / "m.zarr", {"w": (2, (10, 4), 4)}, {})
    with pytest.raises(ValueError, match="whole chunks"):
        store.write("w", 2, np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="whole chunks"):
        store.write("w", 4, np.zeros((2, 2, 4), bool))
    store.write("w", 8, np.ones((2, 2, 4), bool))          # the last, short chunk
    store.write("w", 4, np.zeros((2, 4, 4), bool))         # all False: stored all the same
    store.write("w", 0, torch.ones(2, 8, 4, dtype=torch.bool))
    assert store.read("w", 0).all()
    with pytest.raises(ValueError, match="shape"):
        store.write("w", 0, np.zeros((3, 4, 4), bool))
    with pytest.raises(KeyError, match="no mask array"):
        store.read("nope", 0)


def test_attrs_merge(tmp_path):
    store = MaskStore.create(tmp_path / "m.zarr", {}, {"tasks": ["a", "b"]})
    store.set_attrs({"emr_lambdas": {"a": 1.5, "b": 0.5}})
    assert MaskStore.open(tmp_path / "m.zarr").attrs == {"tasks": ["a", "b"],
                                                          "emr_lambdas": {"a": 1.5, "b": 0.5}}
    with pytest.raises(FileNotFoundError):
        MaskStore.open(tmp_path / "none.zarr")


@pytest.mark.parametrize("name", ["model.layers.0.weight", "a/b", "%x", ".hidden", "..", "__x", "sp ace"])
def test_array_name_encoding(tmp_path, name):
    key = encode_array_name(name)
    assert "/" not in key and not key.startswith(".") and decode_array_name(key) == name
    store = MaskStore.create(tmp_path / "m.zarr", {name: (1, (2,), 2)}, {})
    store.write(name, 0, np.array([[True, False]]))
    assert MaskStore.open(tmp_path / "m.zarr").names() == [name]
    assert MaskStore.open(tmp_path / "m.zarr").read(name, 0).tolist() == [True, False]


def _write_mask_chunks(args) -> None:
    path, name, r0, rows = args
    store = MaskStore.open(path)
    store.write(name, r0, np.arange(2 * rows * 3).reshape(2, rows, 3) % (r0 // rows + 2) == 0)


def test_processes_write_their_own_chunks(tmp_path):
    path = tmp_path / "m.zarr"
    MaskStore.create(path, {"w": (2, (40, 3), 4)}, {})
    with mp.get_context("fork").Pool(4) as pool:      # fork after the parent has used zarr
        pool.map(_write_mask_chunks, [(path, "w", r0, 4) for r0 in range(0, 40, 4)])
    store = MaskStore.open(path)
    for r0 in range(0, 40, 4):
        want = np.arange(2 * 4 * 3).reshape(2, 4, 3) % (r0 // 4 + 2) == 0
        assert np.array_equal(store.read("w", 1, r0, r0 + 4), want[1]), r0


# -- stats ------------------------------------------------------------------------------------------------

def test_write_stats(tmp_path):
    rows = [
        {"tensor": "b", "task": "math", "numel": 10, "q_a": 0.1, "q_b": 0.9, "drop_rate": 0.11, "kept": 9,
         "norm_before": 2.0, "norm_after": 2.0, "mask_density": None},
        {"tensor": "a", "task": "math", "numel": 4},
        {"tensor": "a", "task": "code", "numel": 4, "mask_density": 0.5},
    ]
    path = tmp_path / "stats.parquet"
    write_stats(rows, path, task_order=["code", "math"])
    table = pq.read_table(path)
    assert table.schema.equals(STATS_SCHEMA)
    got = table.to_pylist()
    assert [(r["tensor"], r["task"]) for r in got] == [("a", "code"), ("a", "math"), ("b", "math")]
    assert got[1]["q_a"] is None and got[2]["kept"] == 9 and got[0]["mask_density"] == 0.5
    assert os.listdir(tmp_path) == ["stats.parquet"]
    write_stats(rows, path)                                  # no order: the given task order
    assert [r["task"] for r in pq.read_table(path).to_pylist()][:2] == ["math", "code"]
    with pytest.raises(ValueError, match="unknown column"):
        write_stats([{"tensor": "a", "task": "x", "numel": 1, "qa": 1.0}], path)


DT = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(sorted(DT)), st.lists(st.integers(0, 5), max_size=3)),
                min_size=1, max_size=8),
       st.integers(1, 400), st.integers(1, 4))
def test_any_layout_round_trips(tmp_path_factory, specs, shard_size, block):
    """Any dtypes/shapes (0-d, empty, mixed item sizes) and shard size: safetensors reads back what we wrote."""
    d = tmp_path_factory.mktemp("h")
    g = torch.Generator().manual_seed(len(specs) * 1000 + shard_size)
    sd = {f"t{i}.w": (torch.randn(shape, generator=g) * 50).to(DT[dt]) for i, (dt, shape) in enumerate(specs)}
    plan = plan_shards(entries(sd), shard_size)
    create_shard_files(plan, d)
    with ShardWriter(plan, d) as w:
        for n, t in sd.items():
            if t.dim() == 0:
                w.write(n, t)
            for r0 in range(0, t.shape[0] if t.dim() else 0, block):
                w.write(n, t[r0:r0 + block].contiguous(), row_start=r0)
    write_index(plan, d)
    got = load_like_transformers(d)
    assert all(got[n].shape == t.shape and torch.equal(got[n], t) for n, t in sd.items())


@pytest.mark.parametrize("defer", [False, True])
def test_mask_chunks_written_directly_are_zarrs_bytes(tmp_path, defer):
    """MaskStore encodes its chunks itself (packbits + zstd, no zarr event loop): every chunk file
    holds the bytes zarr writes for the same rows, edge chunks padded as zarr pads them, and the
    ledger's hashes are those of the files."""
    import xxhash
    import zarr
    shapes = {"w": ((10, 6), 4), "e": ((7, 3, 5), 3), "one": ((1, 9), 1)}
    rng = np.random.default_rng(5)
    want = {n: rng.random((3, *s)) < 0.4 for n, (s, _) in shapes.items()}
    ours = MaskStore.create(tmp_path / "ours.zarr", {n: (3, s, c) for n, (s, c) in shapes.items()}, {})
    ref = MaskStore.create(tmp_path / "ref.zarr", {n: (3, s, c) for n, (s, c) in shapes.items()}, {})
    ours.defer_sync = defer
    group = zarr.open_group(str(tmp_path / "ref.zarr"), mode="a")
    for n, (s, c) in shapes.items():
        for r0 in range(0, s[0], c):
            ours.write(n, r0, want[n][:, r0:r0 + c])
            group[ref.array_key(n)][:, r0:r0 + c] = want[n][:, r0:r0 + c]
        sums = ours.take_checksums(n)
        files = sorted(p.relative_to(tmp_path / "ref.zarr") for p in (tmp_path / "ref.zarr" / n).rglob("*")
                       if p.is_file() and p.name != "zarr.json")
        assert len(files) == 3 * -(-s[0] // c)
        for rel in files:
            mine = (tmp_path / "ours.zarr" / rel).read_bytes()
            assert mine == (tmp_path / "ref.zarr" / rel).read_bytes(), rel
            key = str(rel.relative_to(n))
            assert sums["chunks"][key] == [len(mine), xxhash.xxh3_64_hexdigest(mine)]
        for k in range(3):
            assert np.array_equal(MaskStore.open(tmp_path / "ours.zarr").read(n, k), want[n][k])
    assert not list((tmp_path / "ours.zarr").rglob("*.partial"))
