"""Integrity without a merge: the run lock between real processes, missing/garbage mask chunks, hostile
headers and configs, the ledger, symlinked non-weight files, float16 overflow, the worker cap, BrokenPipe.
(End-to-end cases on real merges are in test_integrity_runs.py.)"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, run_cli, write_config, make_family
from pipeline import integrity
from pipeline.checkpoints import Checkpoint, CheckpointError
from pipeline.config import ConfigError, load_config
from pipeline.job import JobError, check_float16
from pipeline.ledger import Ledger, LedgerError
from pipeline.run import cap_workers
from pipeline.writers import MaskStore, MaskStoreError

HOLDER = """
import sys, time
from pipeline.integrity import RunLock
lock = RunLock(sys.argv[1], exclusive=sys.argv[2] == "x", command="holder").acquire()
print("locked", flush=True)
sys.stdin.readline()
"""


def _holder(run_dir: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "run", "x")
    try:
        for exclusive in (True, False):
            with pytest.raises(integrity.LockError) as e:
                integrity.RunLock(tmp_path / "run", exclusive=exclusive, command="merge").acquire()
            assert f"pid {proc.pid}" in str(e.value) and socket.gethostname() in str(e.value)
        assert integrity.running_writer(tmp_path / "run")["pid"] == proc.pid
    finally:
        proc.communicate("\n")
    with integrity.RunLock(tmp_path / "run", exclusive=True, command="merge"):   # released: free again
        pass
    assert integrity.holders(tmp_path / "run") == []


def test_readers_share_and_keep_writers_out(tmp_path):
    proc = _holder(tmp_path / "run", "s")
    try:
        with integrity.read_lock(tmp_path / "run", "export"):
            assert len(integrity.holders(tmp_path / "run")) == 2
        with pytest.raises(integrity.LockError, match=f"pid {proc.pid}"):
            integrity.RunLock(tmp_path / "run", exclusive=True, command="merge").acquire()
    finally:
        proc.communicate("\n")


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path / "run", "x")
    proc.kill()
    proc.wait()
    assert [r["pid"] for r in integrity.holders(tmp_path / "run")] == [proc.pid]   # its record stays
    with caplog.at_level(logging.WARNING, logger="tadrop"):
        with integrity.RunLock(tmp_path / "run", exclusive=True, command="merge"):
            assert [r["pid"] for r in integrity.holders(tmp_path / "run")] == [os.getpid()]
    assert f"stale lock of holder (pid {proc.pid}" in caplog.text and "no longer running" in caplog.text


def test_a_lock_record_of_another_host_is_respected(tmp_path):
    """flock may not reach across hosts (NFS without a lock manager): another host's record wins."""
    d = tmp_path / "run" / ".tadrop" / "holders"
    d.mkdir(parents=True)
    rec = d / "node7-4242.json"
    rec.write_text(json.dumps({"host": "node7", "pid": 4242, "command": "merge", "mode": "exclusive",
                               "started": "2026-01-01T00:00:00+00:00"}))
    for exclusive in (True, False):
        with pytest.raises(integrity.LockError, match="pid 4242, host node7.*another host") as e:
            integrity.RunLock(tmp_path / "run", exclusive=exclusive, command="merge").acquire()
        assert str(rec) in str(e.value)
    assert integrity.running_writer(tmp_path / "run")["host"] == "node7"
    rec.write_text(json.dumps({"host": "node7", "pid": 4242, "command": "export", "mode": "shared"}))
    with integrity.read_lock(tmp_path / "run", "export"):       # readers share across hosts
        pass
    with pytest.raises(integrity.LockError, match="host node7"):
        integrity.RunLock(tmp_path / "run", exclusive=True, command="merge").acquire()
    rec.unlink()
    with integrity.RunLock(tmp_path / "run", exclusive=True, command="merge"):
        pass


def test_missing_or_garbage_mask_chunk_is_an_error_never_fill(tmp_path):
    store = MaskStore.create(tmp_path / "m.zarr", {"w": (2, (8, 4), 4), "zarr.json": (2, (3,), 3)}, {})
    store.write("w", 0, np.ones((2, 8, 4), bool))
    store.write("w", 0, np.zeros((2, 4, 4), bool))             # all False: stored all the same
    store.write("zarr.json", 0, np.array([[True, False, True], [False, False, True]]))
    assert store.take_checksums("w")["chunks"].keys() == {"c/0/0/0", "c/0/1/0", "c/1/0/0", "c/1/1/0"}
    again = MaskStore.open(tmp_path / "m.zarr")
    assert again.names() == ["w", "zarr.json"]                  # a tensor named zarr.json does not collide
    assert again.read("zarr.json", 1).tolist() == [False, False, True]
    assert not again.read("w", 1, 0, 4).any()
    chunk = tmp_path / "m.zarr" / "w" / "c" / "1" / "1" / "0"
    chunk.unlink()
    with pytest.raises(MaskStoreError, match=r"w/c/1/1/0: mask chunk missing \(tensor 'w', task 1\)"):
        again.read("w", 1)
    assert again.read("w", 1, 0, 4).shape == (4, 4)             # other chunks still read
    chunk.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(MaskStoreError, match="tensor 'w'.*unreadable"):
        MaskStore.open(tmp_path / "m.zarr").read("w", 1, 4, 8)
    (tmp_path / "m.zarr" / "w" / "zarr.json").write_text("{not json")
    with pytest.raises(MaskStoreError, match="w/zarr.json"):
        MaskStore.open(tmp_path / "m.zarr").read("w", 0)


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "v": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
], ids=["nested", "dtype-list", "nested-entry"])
def test_hostile_headers_are_one_clear_error(tmp_path, header):
    f = _raw_safetensors(tmp_path / "m" / "model.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(f, "m")
    assert str(f) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("index", [
    '{"weight_map": {"w": ["model-1.safetensors"]}}',
    '{"weight_map": ' + "{" * 0 + '{"w": ' + "[" * 100_000 + "]" * 100_000 + "}}",
], ids=["list-value", "nested"])
def test_hostile_index_is_one_clear_error(tmp_path, index):
    d = tmp_path / "m"
    save_file({"w": torch.zeros(2)}, str(_raw_safetensors(d / "model-1.safetensors", b"{}").parent
                                          / "model-1.safetensors"))
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        Checkpoint.open(d, "m")


def test_binary_yaml_is_a_config_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    with pytest.raises(ConfigError, match="c.yaml: not a YAML text file"):
        load_config(f)
    f.write_bytes(b"base: x\x00\x00\n")
    with pytest.raises(ConfigError, match="NUL"):
        load_config(f)


def test_ledger_invalidation_and_deep_corruption(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as led:
        led.record("merge:a", {"x": 1})
        led.record("merge:b", {"x": 2})
        led.invalidate({"merge:a"})
    assert Ledger(path).done() == {"merge:b": {"x": 2}}
    with Ledger(path) as led:
        led.record("merge:a", {"x": 3})
    assert Ledger(path).done() == {"merge:a": {"x": 3}, "merge:b": {"x": 2}}
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"[" * 100_000 + b"]" * 100_000 + b"\n" + b"".join(lines[1:]))
    with pytest.raises(LedgerError, match="line 2.*nested too deeply"):
        Ledger(path).done()
    path.write_bytes(lines[0] + b'{"job": ["x"], "result": 1}\n' + b"".join(lines[1:]))
    with pytest.raises(LedgerError, match="line 2"):
        Ledger(path).done()


def test_non_weight_symlinks_outside_the_model_are_skipped(tmp_path, caplog):
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not for the output")
    d = tmp_path / "model"
    save_file({"w": torch.zeros(2)}, str(_raw_safetensors(d / "model.safetensors", b"{}")))
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").symlink_to(secret)
    (d / "real_vocab.txt").write_text("a")
    (d / "vocab.txt").symlink_to(d / "real_vocab.txt")           # inside the model dir: fine
    with caplog.at_level(logging.WARNING, logger="tadrop"):
        names = [p.name for p in Checkpoint.open(d, "m").non_weight_files()]
    assert names == ["config.json", "vocab.txt"]
    assert "tokenizer.json: not copied" in caplog.text and "secret.txt" in caplog.text
    # a Hugging Face cache snapshot links into its repo's blobs/: those are copied
    repo = tmp_path / "hub" / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text("{}")
    snap.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(repo / "blobs" / "beef"))
    (snap / "model.safetensors").symlink_to(repo / "blobs" / "beef")
    (snap / "tokenizer.json").symlink_to(Path("../../blobs/f00d"))
    assert [p.name for p in Checkpoint.open(snap, "m").non_weight_files()] == ["tokenizer.json"]


def test_float16_overflow_is_named_or_clamped():
    rows = torch.tensor([[1.0, -7.0e4], [3.0, 4.0]])
    with pytest.raises(JobError, match=r"tensor 'lm_head.weight': float16 overflow: largest magnitude 70000"):
        check_float16(rows, "lm_head.weight", False, [])
    warnings: list[str] = []
    out = check_float16(rows, "lm_head.weight", True, warnings)
    assert torch.isfinite(out.half()).all() and out[0, 1] == -65504.0
    assert warnings and "clamped" in warnings[0] and "lm_head.weight" in warnings[0]
    same = torch.tensor([65504.0, -1.0])
    assert check_float16(same, "x", False, []) is same


def test_workers_are_capped(tmp_path, caplog, family):
    cfg = load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "run", workers=1000))
    with caplog.at_level(logging.WARNING, logger="tadrop"):
        capped = cap_workers(cfg, 21, 21)
    assert capped.workers <= min(21, len(os.sched_getaffinity(0)))
    assert "workers: 1000 capped" in caplog.text
    assert cap_workers(cfg.model_copy(update={"workers": 1}), 21, 21).workers == 1


def _fake_run(tmp_path: Path, **record) -> Path:
    run = tmp_path / "run"
    (run / ".tadrop").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": "abc", "complete": False,
                                              "config": {"method": "emr", "models": []}, **record}))
    (run / ".tadrop" / "plan.json").write_text(json.dumps({"jobs": [{"id": "merge:w", "bytes": 10}]}))
    return run


def test_status_into_a_closed_pipe_says_nothing(tmp_path):
    run = _fake_run(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "status", str(run)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                     # like `| head -1` once it has its line: the reader is gone
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert err == "" and proc.returncode in (1, 3)
    shell = subprocess.run(f"{sys.executable} -m pipeline.cli status {run} | head -1", shell=True,
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                           text=True, timeout=120)
    assert shell.stdout.startswith("run abc") and shell.stderr == ""


def test_corrupt_state_files_are_one_line(tmp_path):
    run = _fake_run(tmp_path)
    (run / ".tadrop" / "plan.json").write_text("[" * 100_000 + "]" * 100_000)
    proc = run_cli("status", run)
    assert proc.returncode == 1 and "plan.json" in proc.stderr and "Traceback" not in proc.stderr
    (run / ".tadrop" / "plan.json").write_text(json.dumps({"jobs": [{"id": "merge:w", "bytes": 10}]}))
    (run / ".tadrop" / "ledger.jsonl").write_text('{"job": "a", "result": {}}\ngarbage\n{"job": "b", "result": {}}\n')
    proc = run_cli("status", run)
    assert proc.returncode == 1 and "ledger.jsonl: line 2" in proc.stderr and "Traceback" not in proc.stderr
    (run / "run.json").write_text('{"run_id": "abc", "complete": true, "config": ' + "[" * 100_000)
    for args in (("status", run), ("verify", run), ("export", run, "--task", "a", "--output", tmp_path / "o")):
        proc = run_cli(*args)
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
        assert "run.json" in proc.stdout + proc.stderr
