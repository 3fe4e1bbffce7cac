"""Out-of-core runs drop each job's inputs from the page cache when the job is done
(pipeline.job.evict_inputs, Checkpoint.evict): the pages really leave the cache, only the job's own
tensor's, and the merge writes the same bytes either way."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import tree_digest
from pipeline.checkpoints import Checkpoint
from pipeline.job import EVICT_ENV, evict_inputs
from test_pipeline_e2e import merge_case

PAGE = mmap.PAGESIZE


def _resident(path, offset: int, nbytes: int) -> float:
    """Share of the byte range's pages in the page cache (mincore on a fresh mapping)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    start = offset - offset % PAGE
    length = offset + nbytes - start
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        pages = (length + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(addr), length, vec) == 0, ctypes.get_errno()
        libc.munmap(ctypes.c_void_p(addr), length)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


def test_evict_drops_the_tensor_pages_and_only_those(tmp_path):
    save_file({"a.weight": torch.randn(1024, 1024), "b.weight": torch.randn(1024, 1024)},
              str(tmp_path / "model.safetensors"))
    fd = os.open(tmp_path / "model.safetensors", os.O_RDONLY)
    os.fsync(fd)             # inputs are clean pages: a dirty page is not dropped (only written back)
    os.close(fd)
    ckpt = Checkpoint.open(tmp_path, "m")
    a, b = ckpt.tensors["a.weight"], ckpt.tensors["b.weight"]
    float(ckpt.view("a.weight").sum()), float(ckpt.view("b.weight").sum())     # read both in
    if _resident(a.file, a.offset, a.nbytes) < 0.99:
        pytest.skip("this file system does not keep the file in the page cache")
    ckpt.release("a.weight")
    ckpt.evict("a.weight")
    # the first and last pages may hold a neighbour's bytes (or the header) too
    assert _resident(a.file, a.offset + PAGE, a.nbytes - 2 * PAGE) == 0.0
    assert _resident(b.file, b.offset + PAGE, b.nbytes - 2 * PAGE) == 1.0
    assert torch.equal(ckpt.view("a.weight"), ckpt.view("a.weight").clone())   # still readable


def test_policy_out_of_core_only_unless_forced(monkeypatch):
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.delenv(EVICT_ENV, raising=False)
    assert not evict_inputs(mem // 4) and evict_inputs(mem)
    # model scope reads every input again in its later phases: cached while they fit in memory
    assert not evict_inputs(3 * mem // 4, reread=True) and evict_inputs(2 * mem, reread=True)
    monkeypatch.setenv(EVICT_ENV, "1")
    assert evict_inputs(0)
    monkeypatch.setenv(EVICT_ENV, "0")
    assert not evict_inputs(10 * mem)


def test_evicting_inputs_writes_the_same_bytes(tmp_path, family_bf16, monkeypatch):
    monkeypatch.setenv(EVICT_ENV, "1")       # workers inherit it
    _, evicted = merge_case(tmp_path / "a", family_bf16, "emr_tadrop", workers=2)
    monkeypatch.setenv(EVICT_ENV, "0")
    _, kept = merge_case(tmp_path / "b", family_bf16, "emr_tadrop", workers=2)
    assert tree_digest(evicted) == tree_digest(kept)
