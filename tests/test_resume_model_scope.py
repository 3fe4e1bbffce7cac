"""Model scope (one TADrop rate per task over the whole model) has two statistics passes before the merge,
global_hi and global_lo, whose per-tensor histogram files the driver merges into selected.npz and
values.npz. SIGKILL inside each pass and around each of those files, on the local executor and on Ray,
re-run the same command: the bytes of an uninterrupted run."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import TINY, llama_shapes, make_family, run_cli, tree_digest, write_config
from ray_fixtures import ray_session  # noqa: F401 - the session's Ray instance

MODEL_SCOPE = dict(method="emr", sparsify={"kind": "tadrop", "scope": "model"})
SIZES = dict(TINY, layers=2)
N = len(llama_shapes(**SIZES))   # merged tensors = jobs per phase (global_hi, global_lo, merge)

# (TADROP_FAULT, where it strikes). after_job counts recorded jobs across the phases, in order.
LOCAL_POINTS = [
    ("after_job:3", "inside global_hi"),
    ("global_select", "pass-1 histograms merged, selected.npz not written"),
    ("global_selected", "selected.npz written, no global_lo job run"),
    (f"after_job:{N + 4}", "inside global_lo"),
    ("global_values_pending", "every global_lo job recorded, values.npz not written"),
    ("global_values", "values.npz written, no merge job run"),
    (f"after_job:{2 * N + 2}", "inside the merge phase that reads values.npz"),
]
RAY_POINTS = ["after_job:3", "global_selected", f"after_job:{N + 4}", "global_values"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("scope_family"), k=3, dtype=torch.bfloat16, seed=11, **SIZES)


@pytest.fixture(scope="module")
def want(tmp_path_factory, fam) -> dict:
    d = tmp_path_factory.mktemp("scope_reference")
    cfg = write_config(d / "ref.yaml", fam, d / "ref", **MODEL_SCOPE)
    run_cli("merge", cfg, "--quiet", check=True, timeout=900)
    digest = tree_digest(d / "ref")
    assert any(k.startswith("masks.zarr/") for k in digest) and "stats.parquet" in digest
    return digest


def _crash_and_resume(tmp_path, fam, want, point, *args, extra=None):
    cfg = write_config(tmp_path / "cfg.yaml", fam, tmp_path / "run", **MODEL_SCOPE, **(extra or {}))
    crashed = run_cli("merge", cfg, "--quiet", *args, env_extra={"TADROP_FAULT": point}, timeout=900)
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["complete"] is False
    run_cli("merge", cfg, "--quiet", *args, check=True, timeout=900)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["complete"] is True
    assert tree_digest(tmp_path / "run") == want


@pytest.mark.slow
@pytest.mark.parametrize("point,where", LOCAL_POINTS, ids=[p for p, _ in LOCAL_POINTS])
def test_local_sigkill_in_model_scope_passes(tmp_path, fam, want, point, where):
    _crash_and_resume(tmp_path, fam, want, point)


@pytest.mark.slow
def test_worker_killed_after_writing_its_histogram_file(tmp_path, fam, want):
    """A worker SIGKILLed between writing its pass file and reporting the job: the driver stops with one
    line (WorkerLost, exit 1), the job is not in the ledger, and the same command finishes the run."""
    cfg = write_config(tmp_path / "cfg.yaml", fam, tmp_path / "run", **MODEL_SCOPE)
    proc = run_cli("merge", cfg, "--quiet", env_extra={"TADROP_FAULT": "global_file:2"}, timeout=900)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tadrop: error:"), proc.stderr
    assert "worker" in lines[0] and ("died" in lines[0] or "killed by" in lines[0]) and "re-run" in lines[0]
    assert "global_hi" in lines[0] or "global_lo" in lines[0], lines[0]   # names the job it was running
    assert json.loads((tmp_path / "run" / "run.json").read_text())["complete"] is False
    run_cli("merge", cfg, "--quiet", check=True, timeout=900)
    assert tree_digest(tmp_path / "run") == want


@pytest.mark.slow
@pytest.mark.parametrize("point", RAY_POINTS)
def test_ray_sigkill_in_model_scope_passes(tmp_path, fam, want, ray_session, point):
    """The driver joins the suite's Ray instance; killing it takes its actors down with it."""
    address = ray_session.get_runtime_context().gcs_address
    _crash_and_resume(tmp_path, fam, want, point, "--executor", "ray", "--ray-address", address,
                      extra={"ray": {"num_cpus_per_actor": 0.5}})

