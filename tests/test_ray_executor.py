"""The Ray executor gives the local executor's bytes: every method, after a killed actor, and on errors."""
from __future__ import annotations

import io
import logging
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pipeline.config import load_config
from pipeline.executor import Executor
from pipeline.job import JobError
from pipeline.run import merge, status

from conftest import make_family, tree_digest, write_config
from ray_fixtures import ray_session  # noqa: F401 - the session's Ray instance

from cluster.actors import ActorResources
from cluster.ray_executor import RayExecutor

TADROP = {"kind": "tadrop", "a": 0.5, "b": 0.95, "rescale": "norm", "scope": "tensor"}
CASES = {
    "ta": dict(method="task_arithmetic"),
    "ties_tadrop": dict(method="ties", sparsify=TADROP),
    "emr_tadrop": dict(method="emr", sparsify=TADROP, output_dtype="bfloat16"),
    "emr_tadrop_model": dict(method="emr", sparsify={**TADROP, "scope": "model"}),  # three phases
    "tall": dict(method="tall_masks", tall={"default_lambda": 0.4}),
}
# A tensor of 64 x 512 floats is ~128 KiB per input: jobs last long enough to be killed mid-way.
MEDIUM = dict(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=512, vocab=512)


@pytest.fixture(scope="module")
def ray_ex(ray_session):
    ex = RayExecutor(2, resources=ActorResources(num_cpus=1, memory=256 * 2**20))
    yield ex
    ex.close()


def _outputs(run: Path) -> dict[str, str]:
    digest = tree_digest(run)
    assert any(k.startswith(("merged/", "unified/")) for k in digest), sorted(digest)
    assert "stats.parquet" in digest
    return digest


def _local_and_ray(tmp_path: Path, family: dict, ex: RayExecutor, **kw) -> tuple[dict, dict]:
    local = load_config(write_config(tmp_path / "local.yaml", family, tmp_path / "local", **kw))
    merge(local, quiet=True)
    on_ray = load_config(write_config(tmp_path / "ray.yaml", family, tmp_path / "ray", executor="ray", **kw))
    merge(on_ray, quiet=True, executor=ex)
    return _outputs(tmp_path / "local"), _outputs(tmp_path / "ray")


@pytest.mark.parametrize("case", sorted(CASES))
def test_ray_equals_local_bit_for_bit(tmp_path, family, ray_ex, case):
    local, ray = _local_and_ray(tmp_path, family, ray_ex, **CASES[case])
    if case.startswith(("emr", "tall")):
        assert any(k.startswith("masks.zarr/") for k in ray)
    assert ray == local


def test_from_config_resources(tmp_path, family):
    cfg = load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "run", executor="ray",
                                   workers=3, memory_budget="1GiB",
                                   ray={"actors": 2, "num_cpus_per_actor": 0.5, "num_gpus_per_actor": 0.25}))
    ex = RayExecutor.from_config(cfg)
    assert ex.actors == 2 and ex.window == 4
    opts = ex.resources.options()
    assert opts["num_cpus"] == 0.5 and opts["num_gpus"] == 0.25
    assert opts["memory"] > 2**30  # the budget plus the process overhead
    assert opts["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert RayExecutor.from_config(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"actors": None})})).actors == 3


class _KillOneActor(Executor):
    """Runs on `inner`'s actors; SIGKILLs one actor process right after the merge phase's first result."""

    def __init__(self, inner: RayExecutor):
        self.inner, self.killed = inner, None

    def run(self, ctx, jobs, on_result):
        def hook(job, result):
            on_result(job, result)
            if self.killed is None and job.kind == "merge":
                self.killed = self.inner.actor_pids()[0]
                os.kill(self.killed, signal.SIGKILL)
        self.inner.run(ctx, jobs, hook)


def test_killed_actor_job_reruns_same_bytes(tmp_path, ray_ex, caplog):
    family = make_family(tmp_path / "models", k=3, seed=5, **MEDIUM)
    kw = dict(method="emr", sparsify=TADROP)
    local = load_config(write_config(tmp_path / "local.yaml", family, tmp_path / "local", **kw))
    merge(local, quiet=True)
    cfg = load_config(write_config(tmp_path / "ray.yaml", family, tmp_path / "ray", executor="ray", **kw))
    ex = _KillOneActor(ray_ex)
    with caplog.at_level(logging.WARNING, logger="tadrop"):
        merge(cfg, quiet=True, executor=ex)
    assert ex.killed is not None and ex.killed not in ray_ex.actor_pids()
    assert "re-running it on a fresh actor" in caplog.text
    assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")


def test_job_error_names_the_tensor_and_run_stays_resumable(tmp_path, ray_ex):
    family = make_family(tmp_path / "models", k=2, seed=3)
    bad = "model.layers.1.mlp.up_proj.weight"
    path = Path(family["task1"]) / "model.safetensors"
    sd = load_file(str(path))
    sd[bad][3, 5] = float("nan")
    save_file(sd, str(path), metadata={"format": "pt"})
    cfg = load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "run", method="task_arithmetic",
                                   executor="ray"))
    with pytest.raises(JobError) as err:
        merge(cfg, quiet=True, executor=ray_ex)
    msg = str(err.value)
    assert bad in msg and "ray::" not in msg and "Traceback" not in msg
    assert status(tmp_path / "run", out=io.StringIO()) == 3
    # the executor is still usable after a failed run (fresh actors)
    ok = make_family(tmp_path / "ok", k=2, seed=4)
    cfg2 = load_config(write_config(tmp_path / "c2.yaml", ok, tmp_path / "run2", method="task_arithmetic"))
    merge(cfg2, quiet=True, executor=ray_ex)
    assert status(tmp_path / "run2", out=io.StringIO()) == 0


def test_actors_use_one_torch_thread(tmp_path, family, ray_ex):
    cfg = load_config(write_config(tmp_path / "c.yaml", family, tmp_path / "run", method="task_arithmetic"))
    merge(cfg, quiet=True, executor=ray_ex)
    info = ray_ex.actor_info()
    assert info and len({w["pid"] for w in info}) == len(info)
    assert all(w["torch_threads"] == 1 and w["omp_threads"] == "1" for w in info), info
