"""The documented Python API (`from pipeline import merge`), run the way users run it: in a fresh
interpreter, from a script without a __main__ guard, from stdin, with Ray made unimportable; and a
dead worker worded by its real cause."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, write_config

SCRIPT = """\
import sys
sys.modules["ray"] = None                     # importing ray would now fail: the API must not need it
from pipeline import merge, RunResult, MergeConfig
result = merge({cfg!r}, output={out!r}, workers=2, method="emr", sparsify={{"kind": "tadrop"}})
assert isinstance(result, RunResult) and isinstance(result.config, MergeConfig)
t = result.stats
print("RESULT", {{"rows": t.num_rows, "columns": t.column_names, "tasks": result.tasks,
                 "scalars": sorted(result.scalars), "unified": str(result.unified),
                 "masks": str(result.masks), "merged": result.merged, "ray": "ray" in sys.modules and
                 sys.modules["ray"] is not None}})
print("EXPORT", result.export("task1", {exp!r}))
"""


def _python(args, tmp_path, stdin=None, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, input=stdin, capture_output=True,
                          text=True, timeout=600)


def _check(proc, tmp_path):
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    got = eval(line[len("RESULT "):])  # noqa: S307 - our own printed dict
    assert got["rows"] > 0 and {"tensor", "task", "drop_rate"} <= set(got["columns"])
    assert got["tasks"] == ["task0", "task1", "task2"] and got["scalars"] == ["emr_lambdas", "emr_rescaler"]
    assert got["merged"] is None and got["unified"].endswith("unified") and not got["ray"]
    assert (tmp_path / "exp" / "config.json").exists() and (tmp_path / "exp" / "README.md").exists()


@pytest.mark.parametrize("how", ["script_without_guard", "stdin"])
def test_merge_from_a_script_or_stdin_with_worker_processes(tmp_path, family, how):
    cfg = write_config(tmp_path / "c.yaml", family, tmp_path / "ignored")
    code = SCRIPT.format(cfg=str(cfg), out=str(tmp_path / "run"), exp=str(tmp_path / "exp"))
    env = {"TADROP_INLINE_BYTES": "0"}            # real worker processes, the case that used to break
    if how == "stdin":
        proc = _python(["-"], tmp_path, stdin=code, env_extra=env)
    else:
        (tmp_path / "user_script.py").write_text(code)
        proc = _python(["user_script.py"], tmp_path, env_extra=env)
    _check(proc, tmp_path)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["complete"] is True


def test_merge_in_the_driver_gives_the_same_bytes(tmp_path, family):
    """A small merge runs in the calling process (no worker start-up) and writes the same bytes."""
    from conftest import tree_digest
    cfg = write_config(tmp_path / "c.yaml", family, tmp_path / "ignored")
    code = textwrap.dedent(f"""
        from pipeline import merge
        r = merge({str(cfg)!r}, output={str(tmp_path / 'inline')!r}, method="ties", quiet=False)
        print(r.timings)
    """)
    inline = _python(["-c", code], tmp_path, env_extra={"TADROP_INLINE_BYTES": str(10**9)})
    assert inline.returncode == 0, inline.stderr
    assert "in this process" in inline.stderr and "starting" not in inline.stderr
    workers = _python(["-c", code.replace("'inline'", "'workers'").replace(str(tmp_path / "inline"),
                                                                             str(tmp_path / "workers"))],
                      tmp_path, env_extra={"TADROP_INLINE_BYTES": "0"})
    assert workers.returncode == 0, workers.stderr
    assert "starting 2 worker processes" in workers.stderr    # the progress line says what it waits for
    assert tree_digest(tmp_path / "inline") == tree_digest(tmp_path / "workers")


@pytest.mark.parametrize("fault,words", [("worker_signal:KILL", ["SIGKILL (signal 9)", "not by the out-of-memory"]),
                                         ("worker_signal:SEGV", ["SIGSEGV (signal 11)"]),
                                         ("worker_exit:3", ["exited with code 3"])])
def test_dead_worker_is_worded_by_its_real_cause(tmp_path, family, fault, words):
    from conftest import run_cli
    cfg = write_config(tmp_path / "c.yaml", family, tmp_path / "run")
    proc = run_cli("merge", cfg, "--quiet", env_extra={"TADROP_FAULT": fault, "TADROP_INLINE_BYTES": "0"})
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tadrop: error: worker process") and "while running job" in last
    for w in words:
        assert w in last
    if "KILL" not in fault:
        assert "memory" not in last
    assert "Traceback" not in proc.stderr.split("tadrop: error")[-1]
