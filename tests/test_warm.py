"""Workers started before the driver imports torch (pipeline.warm): when they start, that the executor
adopts them and still merges the same bytes, and that none are left behind when the run needs none."""
from __future__ import annotations

import multiprocessing
import os
import shutil

import pytest

from conftest import make_family, tree_digest, write_config
from pipeline import cli, warm
from pipeline.config import load_config


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _no_leftover_pool():
    yield
    warm.discard()


def test_prestart_follows_the_executor_rules(tmp_path, family, monkeypatch):
    cfg = load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "run"))
    monkeypatch.setenv("TADROP_INLINE_BYTES", str(10**12))      # small run: merged in the driver
    assert not warm.maybe_prestart(cfg) and warm._prestarted is None
    monkeypatch.setenv("TADROP_INLINE_BYTES", "0")
    assert not warm.maybe_prestart(cfg.model_copy(update={"executor": "ray"}))
    assert not warm.maybe_prestart(cfg.model_copy(update={"base": "org/some-model"}))   # a repo id
    assert warm._prestarted is None
    assert warm.maybe_prestart(cfg)
    n, pool = warm._prestarted
    assert n == min(cfg.workers, _cores())
    assert warm.take_prestarted(n) is pool and warm._prestarted is None
    pids = {pool.submit(warm._ready).result(timeout=120) for _ in range(4)}
    assert os.getpid() not in pids and len(pids) <= n
    warm.stop(pool)


def test_a_pool_of_another_size_is_stopped():
    warm.prestart(1)
    pool = warm._prestarted[1]
    pool.submit(warm._ready).result(timeout=120)
    procs = list(pool._processes.values())
    assert procs and warm.take_prestarted(2) is None
    for p in procs:
        p.join(10)
        assert p.exitcode is not None


def test_cli_merge_adopts_the_prestarted_workers_same_bytes(tmp_path, family, monkeypatch):
    """The CLI's merge (prestarted workers) gives the bytes of the same merge run in the driver."""
    monkeypatch.setenv("TADROP_INLINE_BYTES", "0")
    taken = []
    real = warm.take_prestarted
    monkeypatch.setattr(warm, "take_prestarted", lambda n: taken.append(real(n)) or taken[-1])
    import pipeline.executor as ex
    monkeypatch.setattr(ex, "take_prestarted", warm.take_prestarted)
    cfg = write_config(tmp_path / "c.yaml", family, tmp_path / "workers", method="ties")
    assert cli.main(["merge", str(cfg), "--quiet"]) == 0
    assert taken and taken[0] is not None            # the executor ran on the prestarted pool
    assert not list((tmp_path / "workers").rglob("worker-context-*"))   # the pickled context is gone
    monkeypatch.setenv("TADROP_INLINE_BYTES", str(10**12))
    cfg2 = write_config(tmp_path / "c2.yaml", family, tmp_path / "inline", method="ties")
    assert cli.main(["merge", str(cfg2), "--quiet"]) == 0
    assert tree_digest(tmp_path / "workers") == tree_digest(tmp_path / "inline")
    assert not multiprocessing.active_children()     # the executor stopped its workers


def test_cli_merge_that_fails_before_its_jobs_leaves_no_workers(tmp_path, monkeypatch):
    """Workers start before the inputs are validated: a run refused there stops them."""
    monkeypatch.setenv("TADROP_INLINE_BYTES", "0")
    started = []
    real = warm.prestart
    monkeypatch.setattr(warm, "prestart", lambda n: started.append(n) or real(n))
    fam = make_family(tmp_path / "fam", k=2, seed=3)
    bad = fam["task1"] / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[8:16] = b"{{{{{{{{"                           # a garbled header
    bad.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "c.yaml", fam, tmp_path / "run")
    assert cli.main(["merge", str(cfg), "--quiet"]) == 1
    assert started and warm._prestarted is None      # workers had started, and were stopped
    for p in multiprocessing.active_children():
        p.join(10)
    assert not multiprocessing.active_children()
    assert not (tmp_path / "run" / "run.json").exists()
    shutil.rmtree(tmp_path / "fam")
