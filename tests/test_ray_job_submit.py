"""End to end through Ray's front doors: `ray job submit` to a head on loopback, and `tadrop merge
--executor ray` (a private instance), including a driver killed mid-run and resumed.

The head is started with `ray start --head --block` in its own temp dir and token file; SIGTERM to
that one process drains and stops exactly that head (`ray stop` would stop every Ray on the machine).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.run import merge

from conftest import REPO, make_family, run_cli, tree_digest, write_config

pytestmark = pytest.mark.slow

TADROP = {"kind": "tadrop", "a": 0.5, "b": 0.95, "rescale": "norm", "scope": "tensor"}
KW = dict(method="emr", sparsify=TADROP, output_dtype="bfloat16")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so a killed pytest leaves no head behind."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0 and "block forever" in log.read_text():
                return
        time.sleep(0.5)
    raise AssertionError(f"the Ray head did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head():
    """A head on loopback with its own temp dir, ports and auth token; yields (dashboard URL, env)."""
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, metrics, runtime_env = _free_ports(6)
    log = tmp / "start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
             "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
             "--temp-dir", str(tmp), "--num-cpus", "2", "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        _wait_port(dash, proc, log)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        proc.send_signal(signal.SIGTERM)  # this head only: `ray start --block` drains and stops its processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _working_dir(dst: Path) -> Path:
    """The code a job needs, as `--working-dir . ` would upload it from a checkout (minus data)."""
    for pkg in ("tadrop", "pipeline", "cluster"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _local_digest(tmp_path: Path, family: dict) -> dict:
    merge(load_config(write_config(tmp_path / "local.yaml", family, tmp_path / "local", **KW)), quiet=True)
    return tree_digest(tmp_path / "local")


def test_ray_job_submit_equals_local(tmp_path, ray_head):
    url, env = ray_head
    family = make_family(tmp_path / "models", k=3, seed=11)
    cfg = write_config(tmp_path / "ray.yaml", family, tmp_path / "ray", **KW)
    wd = _working_dir(tmp_path / "wd")
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", url, "--working-dir", str(wd), "--",
         "python", "-m", "cluster.job", str(cfg), "--workers", "2", "--quiet"],
        env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    assert tree_digest(tmp_path / "ray") == _local_digest(tmp_path, family)


def test_ray_job_refuses_output_inside_its_working_dir(tmp_path, ray_head):
    url, env = ray_head
    family = make_family(tmp_path / "models", k=2, seed=12)
    wd = _working_dir(tmp_path / "wd")
    write_config(wd / "rel.yaml", family, Path("runs/rel"), **KW)
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", url, "--working-dir", str(wd), "--",
         "python", "-m", "cluster.job", "rel.yaml"],
        env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "temporary copy of the working_dir" in out, out[-4000:]


def test_cli_ray_executor_driver_killed_then_resumed(tmp_path):
    """`tadrop merge --executor ray` on a private instance; the driver SIGKILLs itself after 3 jobs,
    the same command resumes from the ledger and gives the uninterrupted run's bytes."""
    family = make_family(tmp_path / "models", k=3, seed=13)
    cfg = write_config(tmp_path / "ray.yaml", family, tmp_path / "ray", **KW)
    env = {"RAY_ADDRESS": ""}
    first = run_cli("merge", cfg, "--executor", "ray", "--quiet", env_extra={**env, "TADROP_FAULT": "after_job:3"})
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert run_cli("status", tmp_path / "ray").returncode == 3
    second = run_cli("merge", cfg, "--executor", "ray", env_extra=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming run" in second.stderr and "ray: connected" in second.stderr
    assert tree_digest(tmp_path / "ray") == _local_digest(tmp_path, family)
