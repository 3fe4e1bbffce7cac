"""The command line used wrongly or interrupted: Ctrl-C exits 130 and the run resumes; `status` and
`report` on things that are not (finished) runs answer with one line and the documented exit code."""
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

# Tensors of 64 x 512 floats: jobs last long enough for a Ctrl-C to land mid-run.
MEDIUM = dict(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=512, vocab=512)


def _one_line_error(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tadrop: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_same_command_resumes(tmp_path):
    fam = make_family(tmp_path / "fam", k=3, seed=21, **MEDIUM)
    kw = dict(method="emr", sparsify={"kind": "tadrop"})
    ref = write_config(tmp_path / "ref.yaml", fam, tmp_path / "ref", **kw)
    run_cli("merge", ref, "--quiet", check=True, timeout=900)
    cfg = write_config(tmp_path / "cfg.yaml", fam, tmp_path / "run", workers=1, **kw)
    # the driver holds still after its second recorded job (pipeline/faults.py), so the interrupt
    # always lands mid-merge however fast or loaded the machine is
    pause = tmp_path / "pause"
    pause.touch()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TADROP_PAUSE": "after_job:2",
           "TADROP_PAUSE_FILE": str(pause)}
    # its own process group, like a shell job: Ctrl-C sends SIGINT to the driver and its workers together.
    # SIGINT back to its default first: a suite started in the background (`cmd &`, nohup, some CI
    # runners) inherits SIGINT ignored, and an ignored signal stays ignored across exec, so the merge
    # would never see the Ctrl-C
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "merge", str(cfg), "--quiet"], cwd=REPO,
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    reached = Path(str(pause) + ".reached")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not reached.exists():
        time.sleep(0.01)
    assert proc.poll() is None and reached.exists(), "the merge ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err and "re-run" in err, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["complete"] is False
    assert run_cli("status", tmp_path / "run").returncode == 3
    run_cli("merge", cfg, "--quiet", check=True, timeout=900)
    assert tree_digest(tmp_path / "run") == tree_digest(tmp_path / "ref")


def test_status_of_things_that_are_not_runs(tmp_path):
    (tmp_path / "file.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "run.json").write_text("{not json")
    (tmp_path / "no_id").mkdir()
    (tmp_path / "no_id" / "run.json").write_text(json.dumps({"complete": True}))
    for what in ("nowhere", "file.txt", "empty", "corrupt", "no_id"):
        proc = run_cli("status", tmp_path / what)
        assert proc.returncode == 2, (what, proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        text = (proc.stdout + proc.stderr).replace(str(tmp_path), "<dir>")
        assert "not a tadrop run" in text, (what, text)
    usage = run_cli("status")
    assert usage.returncode == 2 and "usage:" in usage.stderr and "run_dir" in usage.stderr


def test_report_of_things_that_are_not_finished_runs(tmp_path, family):
    missing = run_cli("report", tmp_path / "nowhere")
    assert missing.returncode == 1
    line = _one_line_error(missing, "stats.parquet")
    assert str(tmp_path / "nowhere") in line
    cfg = write_config(tmp_path / "c.yaml", family, tmp_path / "run", method="emr", sparsify={"kind": "tadrop"})
    crashed = run_cli("merge", cfg, "--quiet", env_extra={"TADROP_FAULT": "after_plan"})
    assert crashed.returncode == -signal.SIGKILL
    unfinished = run_cli("report", tmp_path / "run")
    assert unfinished.returncode == 1
    _one_line_error(unfinished, "stats.parquet")
    assert not (tmp_path / "run" / "report.txt").exists()
    run_cli("merge", cfg, "--quiet", check=True)
    stats = tmp_path / "run" / "stats.parquet"
    good = stats.read_bytes()
    stats.write_bytes(good[: len(good) // 2])   # damaged: one line naming the file, never a traceback
    damaged = run_cli("report", tmp_path / "run")
    assert damaged.returncode == 1, (damaged.returncode, damaged.stderr[-2000:])
    _one_line_error(damaged, "stats.parquet")
    stats.write_bytes(good)
    assert run_cli("report", tmp_path / "run").returncode == 0
