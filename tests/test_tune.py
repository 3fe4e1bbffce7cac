"""`tadrop tune` end to end with a toy scoring function: per-task lambda chosen, only the masks rewritten,
the result equal to a fresh merge with those tall.lambdas; resumable after a crash of the scorer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.export import export_task
from pipeline.run import merge
from pipeline.tune import load_model, tune
from pipeline.writers import MaskStore

from conftest import run_cli, tree_digest, write_config
import tune_scores

GRID = "0.2,0.4,0.6"


def _merge(tmp_path: Path, family: dict, name: str, **kw) -> Path:
    cfg = load_config(write_config(tmp_path / f"{name}.yaml", family, tmp_path / name, method="tall_masks", **kw))
    merge(cfg, quiet=True)
    return tmp_path / name


def _assert_same_as_fresh(tmp_path, family, run: Path, lambdas: dict, **kw):
    kw = dict(kw)
    fresh = _merge(tmp_path, family, "fresh", tall={**kw.pop("tall", {}), "lambdas": lambdas}, **kw)
    a, b = MaskStore.open(run / "masks.zarr", mode="r"), MaskStore.open(fresh / "masks.zarr", mode="r")
    assert a.names() == b.names()
    assert a.attrs["tall_lambdas"] == b.attrs["tall_lambdas"] == lambdas
    for n in a.names():
        for k in range(len(lambdas)):
            np.testing.assert_array_equal(a.read(n, k), b.read(n, k), err_msg=f"{n} task {k}")
    assert pq.read_table(run / "stats.parquet").equals(pq.read_table(fresh / "stats.parquet"))
    ours_rec, theirs_rec = (json.loads((d / "run.json").read_text()) for d in (run, fresh))
    assert ours_rec.get("storage", {}).get("mask_density") == theirs_rec.get("storage", {}).get("mask_density")
    for t in lambdas:
        ours = export_task(run, t, tmp_path / "exp" / f"tuned_{t}")
        theirs = export_task(fresh, t, tmp_path / "exp" / f"fresh_{t}")
        assert tree_digest(ours) == tree_digest(theirs), t
    return fresh


def test_tune_cli_end_to_end(tmp_path, family):
    run = _merge(tmp_path, family, "run")
    before = tree_digest(run)
    env = {"TADROP_TUNE_BASE": str(family["base"])}
    proc = run_cli("tune", run, "--grid", GRID, "--score", "tests.tune_scores:score", "--quiet", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((run / "run.json").read_text())["tune"]
    lambdas = rec["lambdas"]
    assert lambdas["task0"] == 0.2 and lambdas["task1"] == 0.6          # the toy targets' extremes
    assert set(rec["scores"]) == set(lambdas) and all(len(v) == 3 for v in rec["scores"].values())
    for t, s in rec["scores"].items():                                    # the best (first on ties)
        assert lambdas[t] == max((0.2, 0.4, 0.6), key=lambda g: s[str(g)])
    after = tree_digest(run)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    # only the masks and their densities in stats.parquet rewritten
    assert changed and all(k.startswith("masks.zarr/") or k == "stats.parquet" for k in changed)
    assert run_cli("verify", run).returncode == 0                         # checksums follow the rewrite
    assert not (run / ".tadrop" / "tune").exists()
    fresh = _assert_same_as_fresh(tmp_path, family, run, lambdas)
    # the recorded score is the score of the fresh run's task model
    import os
    os.environ["TADROP_TUNE_BASE"] = str(family["base"])
    for t in ("task0", "task2"):
        model = load_model(export_task(fresh, t, tmp_path / "exp" / f"score_{t}"))
        assert tune_scores.score(t, model) == rec["scores"][t][str(lambdas[t])]
    again = run_cli("tune", run, "--grid", GRID, "--score", "tests.tune_scores:score", env_extra=env)
    assert again.returncode == 0 and tree_digest(run) == after               # already tuned: untouched


def test_tune_resumes_after_a_crash(tmp_path, family, monkeypatch):
    """Model-scope TADrop (the run's global statistics) and row chunks; the scorer dies on its 5th
    call: the rerun continues from the ledger (no score computed twice), same result as in one go."""
    kw = dict(sparsify={"kind": "tadrop", "scope": "model"}, memory_budget="24KiB")
    run = _merge(tmp_path, family, "run", **kw)
    count = tmp_path / "calls"
    monkeypatch.setenv("TADROP_TUNE_BASE", str(family["base"]))
    monkeypatch.setenv("TADROP_TUNE_COUNT", str(count))
    monkeypatch.setenv("TADROP_TUNE_FAIL_AFTER", "5")
    proc = run_cli("tune", run, "--grid", GRID, "--score", "tests.tune_scores:flaky")
    assert proc.returncode == 1 and "scorer crashed (test)" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tadrop: error: score function failed on task") and "Traceback" not in proc.stderr
    assert "tune" not in json.loads((run / "run.json").read_text())
    assert int(count.read_text()) == 5
    rec = tune(run, (0.2, 0.4, 0.6), "tests.tune_scores:flaky", quiet=True)
    assert int(count.read_text()) == 5 + 9 - 4                            # 4 scores were ledgered
    _assert_same_as_fresh(tmp_path, family, run, rec["lambdas"], **kw)


def test_tune_refuses_bad_input(tmp_path, family):
    emr = tmp_path / "emr"
    merge(load_config(write_config(tmp_path / "e.yaml", family, emr, method="emr")), quiet=True)
    before = tree_digest(emr)
    for args, msg in [((emr, "--score", "tests.tune_scores:score"), "needs method tall_masks"),
                      ((tmp_path / "nothing", "--score", "x:y"), "not a tadrop run"),
                      ((emr, "--grid", "0.2,a", "--score", "x:y"), "--grid"),
                      ((emr, "--score", "noseparator"), "MODULE:FUNCTION")]:
        proc = run_cli("tune", *args)
        assert proc.returncode == 1 and msg in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert tree_digest(emr) == before
    tall = _merge(tmp_path, family, "tall")
    proc = run_cli("tune", tall, "--score", "tests.no_such_module:f")
    assert proc.returncode == 1 and "cannot import" in proc.stderr
    assert "tune" not in json.loads((tall / "run.json").read_text())


@pytest.mark.parametrize("grid", ["0.2", "0,1e9"])
def test_grid_edges(tmp_path, family, grid, monkeypatch):
    monkeypatch.setenv("TADROP_TUNE_BASE", str(family["base"]))
    run = _merge(tmp_path, family, "run", tall={"inner": "ties"})
    rec = tune(run, [float(g) for g in grid.split(",")], "tests.tune_scores:score", quiet=True)
    _assert_same_as_fresh(tmp_path, family, run, rec["lambdas"], tall={"inner": "ties"})
