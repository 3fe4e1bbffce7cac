"""Hugging Face repo ids as inputs, resolved offline from a real cache layout (refs/, snapshots/
symlinked into blobs/); the resolved commit is part of the run's identity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.sources.hub import parse_repo_id

from conftest import run_cli, tree_digest
from tiny_hf import hf_cache


def cfg_file(path: Path, base, models: list[dict], out: Path, **kw) -> Path:
    cfg = {"base": str(base), "models": models, "output": str(out), "workers": 1, "memory_budget": "256MiB",
           "method": "ties", **kw}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture()
def cache(tmp_path, family):
    c = tmp_path / "hub"
    commits = {n: hf_cache(c, f"org/{n}", Path(p)) for n, p in family.items()}
    return c, commits


def env(cache_dir):
    return {"HF_HUB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}


def test_parse_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_repo_id("meta-llama/Llama-3.1-8B") == ("meta-llama/Llama-3.1-8B", "main")
    assert parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_repo_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    (tmp_path / "org" / "local").mkdir(parents=True)
    for not_ids in ("org/local", "./org/name", "/abs/name", "a/b/c", "name", "~/x/y"):
        assert parse_repo_id(not_ids) is None, not_ids


@pytest.mark.slow
def test_repo_ids_merge_like_paths(tmp_path, family, cache):
    c, _ = cache
    names = [n for n in family if n != "base"]
    by_path = cfg_file(tmp_path / "p.yaml", family["base"], [{"name": n, "path": str(family[n])} for n in names],
                       tmp_path / "by-path")
    by_id = cfg_file(tmp_path / "i.yaml", "org/base", [{"name": n, "path": f"org/{n}"} for n in names],
                     tmp_path / "by-id")
    run_cli("merge", by_path, check=True)
    run_cli("merge", by_id, check=True, env_extra=env(c))
    by_id_tree, by_path_tree = tree_digest(tmp_path / "by-id"), tree_digest(tmp_path / "by-path")
    # the model card names the inputs as the config gave them (a repo id here, a path there)
    assert "org/base" in (tmp_path / "by-id" / "merged" / "README.md").read_text()
    by_id_tree.pop("merged/README.md"), by_path_tree.pop("merged/README.md")
    assert by_id_tree == by_path_tree
    record = json.loads((tmp_path / "by-id" / "run.json").read_text())
    assert record["config"]["base"] == "org/base"
    snap = record["inputs"]["base"]["@snapshot"]
    assert snap["repo_id"] == "org/base" and snap["revision"] == "main" and len(snap["commit"]) == 40


@pytest.mark.slow
def test_revision_by_branch_and_commit(tmp_path, family, cache):
    c, commits = cache
    names = [n for n in family if n != "base"]
    other = hf_cache(c, "org/base", Path(family[names[0]]), commit="b" * 40, ref="experimental")
    for rev, want in (("experimental", other), (commits["base"], commits["base"])):
        out = tmp_path / f"run-{rev[:8]}"
        run_cli("merge", cfg_file(tmp_path / "c.yaml", f"org/base@{rev}", [{"name": names[1], "path": f"org/{names[1]}"}],
                                  out), check=True, env_extra=env(c))
        assert json.loads((out / "run.json").read_text())["inputs"]["base"]["@snapshot"]["commit"] == want


def test_missing_repo_id_is_one_line_naming_id_revision_and_cache(tmp_path, family, cache):
    c, _ = cache
    proc = run_cli("merge", cfg_file(tmp_path / "c.yaml", "org/base", [{"name": "x", "path": "org/nope@v9"}],
                                     tmp_path / "run"), env_extra=env(c))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "'org/nope'" in line and "'v9'" in line and str(c) in line and "model 'x'" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cache_update_between_crash_and_resume_is_detected(tmp_path, family, cache):
    c, commits = cache
    names = [n for n in family if n != "base"]
    path = cfg_file(tmp_path / "c.yaml", "org/base", [{"name": n, "path": f"org/{n}"} for n in names], tmp_path / "run")
    crashed = run_cli("merge", path, env_extra={**env(c), "TADROP_FAULT": "after_job:2"})
    assert crashed.returncode != 0
    # the same files under a new commit: only the snapshot moved, yet the run must not continue over it
    hf_cache(c, f"org/{names[0]}", Path(family[names[0]]), commit="c" * 40)
    proc = run_cli("merge", path, env_extra=env(c))
    assert proc.returncode == 1
    assert f"input {names[0]}.@snapshot.commit" in proc.stderr and "c" * 40 in proc.stderr
