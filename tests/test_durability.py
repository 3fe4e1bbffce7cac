"""How a job's outputs become durable before the ledger names it: one syncfs(2) per job where the
run directory's file system allows it, else an fsync per file and per directory; the same bytes
either way."""
from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.job as job_module
from pipeline import merge, writers

from conftest import tree_digest, write_config

TADROP = {"kind": "tadrop", "a": 0.5, "b": 0.95, "rescale": "norm"}


def test_fs_type_is_read_from_the_mount_table(tmp_path):
    assert writers._fs_type(Path("/proc/self")) == "proc"
    assert not writers.syncfs_usable("/proc")         # not a disk file system: fsync file by file
    assert writers._fs_type(tmp_path) is not None


def test_env_turns_syncfs_off(monkeypatch, tmp_path):
    monkeypatch.setenv("TADROP_SYNCFS", "0")
    assert not writers.syncfs_usable(tmp_path)


def test_syncfs_error_names_the_path(tmp_path):
    writers.syncfs(tmp_path)
    with pytest.raises(OSError, match="missing"):
        writers.syncfs(tmp_path / "missing")


@pytest.mark.slow
def test_same_outputs_with_one_syncfs_per_job_or_fsync_per_file(tmp_path, family_bf16, monkeypatch):
    calls = []
    real = job_module.syncfs

    def spy(path):
        calls.append(path)
        real(path)
    monkeypatch.setattr(job_module, "syncfs", spy)

    digests = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("TADROP_SYNCFS", mode)
        calls.clear()
        out = tmp_path / f"run{mode}"
        merge(write_config(tmp_path / f"cfg{mode}.yaml", family_bf16, out, method="emr",
                           sparsify=TADROP), quiet=True)
        digests[mode] = tree_digest(out)
        if mode == "0":
            assert calls == []
        elif writers.syncfs_usable(tmp_path):
            assert calls, "the jobs' outputs were not made durable by syncfs"
    assert digests["1"] == digests["0"]
    assert any(k.startswith("masks.zarr/") for k in digests["1"])
