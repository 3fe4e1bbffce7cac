"""Crash at any moment, re-run the same command, get the bytes of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_family, run_cli, tree_digest, write_config

EMR_TADROP = dict(method="emr", sparsify={"kind": "tadrop"})
TIES = dict(method="ties", output_dtype="bfloat16")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("resume_family"), k=3, dtype=torch.bfloat16, seed=5,
                       hidden=64, intermediate=96, vocab=96, layers=3)


_REFERENCE: dict[str, dict] = {}


def _uninterrupted(tmp_path_factory, fam, kw) -> dict:
    key = json.dumps(kw, sort_keys=True)
    if key not in _REFERENCE:
        d = tmp_path_factory.mktemp("reference")
        cfg = write_config(d / "ref.yaml", fam, d / "ref", **kw)
        run_cli("merge", cfg, "--quiet", check=True)
        _REFERENCE[key] = tree_digest(d / "ref")
    return _REFERENCE[key]


CRASHES = [(EMR_TADROP, p) for p in ["after_plan", "after_job:1", "after_job:7", "reduce_prepared",
                                     "reduce_publish:1", "reduce_publish:2", "before_complete"]]
CRASHES += [(TIES, p) for p in ["after_job:4", "reduce_publish:1"]]


@pytest.mark.slow
@pytest.mark.parametrize("kw,point", CRASHES, ids=[f"{k['method']}-{p}" for k, p in CRASHES])
def test_sigkill_then_resume_is_byte_identical(tmp_path, tmp_path_factory, fam, kw, point):
    want = _uninterrupted(tmp_path_factory, fam, kw)
    cfg = write_config(tmp_path / "cfg.yaml", fam, tmp_path / "run", **kw)
    crashed = run_cli("merge", cfg, "--quiet", env_extra={"TADROP_FAULT": point})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["complete"] is False
    assert run_cli("status", tmp_path / "run").returncode == 3
    run_cli("merge", cfg, "--quiet", check=True)
    assert run_cli("status", tmp_path / "run").returncode == 0
    assert tree_digest(tmp_path / "run") == want


@pytest.mark.slow
def test_external_sigkill_of_the_whole_process_tree(tmp_path, tmp_path_factory, fam):
    """Kill driver and workers together mid-jobs (as a node loss would), then resume."""
    want = _uninterrupted(tmp_path_factory, fam, EMR_TADROP)
    cfg = write_config(tmp_path / "cfg.yaml", fam, tmp_path / "run", workers=1, **EMR_TADROP)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "merge", str(cfg), "--quiet"], cwd=REPO,
                            env=env, start_new_session=True, stderr=subprocess.PIPE)
    ledger = tmp_path / "run" / ".tadrop" / "ledger.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ledger.exists() and len(ledger.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads((tmp_path / "run" / "run.json").read_text())["complete"]
    run_cli("merge", cfg, "--quiet", check=True)
    assert tree_digest(tmp_path / "run") == want


def test_same_output_with_other_config_is_refused(tmp_path, fam):
    cfg = write_config(tmp_path / "a.yaml", fam, tmp_path / "run", **EMR_TADROP)
    crashed = run_cli("merge", cfg, "--quiet", env_extra={"TADROP_FAULT": "after_job:2"})
    assert crashed.returncode == -signal.SIGKILL
    other = write_config(tmp_path / "b.yaml", fam, tmp_path / "run", method="emr",
                         sparsify={"kind": "tadrop", "a": 0.4})
    proc = run_cli("merge", other)
    assert proc.returncode == 1
    assert "holds another run" in proc.stderr and "sparsify.a" in proc.stderr


def test_changed_input_is_refused(tmp_path):
    fam = make_family(tmp_path / "fam", k=2, seed=9)
    cfg = write_config(tmp_path / "a.yaml", fam, tmp_path / "run", **EMR_TADROP)
    assert run_cli("merge", cfg, "--quiet", env_extra={"TADROP_FAULT": "after_plan"}).returncode == -9
    target = Path(fam["task1"]) / "model.safetensors"
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file looks rewritten
    proc = run_cli("merge", cfg)
    assert proc.returncode == 1 and "holds another run" in proc.stderr and "task1" in proc.stderr


@pytest.mark.slow
def test_worker_killed_mid_chunk_leaves_no_temp_file(tmp_path, tmp_path_factory, fam):
    """zarr writes a chunk to `<chunk>.<uuid>.partial` and renames it; a worker SIGKILLed between the two
    leaves that file behind. The job is redone on resume and the temp file must not reach the output."""
    want = _uninterrupted(tmp_path_factory, fam, EMR_TADROP)
    cfg = write_config(tmp_path / "cfg.yaml", fam, tmp_path / "run", **EMR_TADROP)
    crashed = run_cli("merge", cfg, "--quiet", env_extra={"TADROP_FAULT": "after_job:1"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    masks = tmp_path / "run" / ".tadrop" / "masks.zarr.partial"
    chunk_dirs = [p.parent for p in masks.rglob("zarr.json") if p.parent != masks]
    assert chunk_dirs, list(masks.iterdir())
    stray = chunk_dirs[0] / "c" / f"0.{'ab' * 16}.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"")
    run_cli("merge", cfg, "--quiet", check=True)
    assert not list((tmp_path / "run").rglob("*.partial")), list((tmp_path / "run").rglob("*.partial"))
    assert tree_digest(tmp_path / "run") == want
