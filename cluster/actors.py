"""The Ray actor that runs jobs: one long-lived `JobRunner` per actor, so the K+1 checkpoints stay
mmapped across its jobs, and one torch thread, so the output bits do not depend on thread counts.

A fresh context (the next phase of a run) is handed to the live actor through `setup` instead of
starting a new process. `setup` is also where a bad context fails (an application error, reported
once), and its answer tells the driver that the actor has been placed and started.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import ray

# Set in the actor's environment before torch is imported there (OpenMP reads it once, at load).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class JobActor:
    """Lives in a Ray worker process; wraps the pipeline's `JobRunner`."""

    def __init__(self):
        import torch
        torch.set_num_threads(1)
        self._runner = None

    def setup(self, ctx) -> dict:
        """(Re)build the runner for this context; returns where the actor runs (for logs and tests)."""
        from pipeline.job import JobRunner
        self._runner = None  # drop the old context's mmaps and file handles first
        self._runner = JobRunner(ctx)
        return self.where()

    def run(self, job) -> dict:
        if self._runner is None:
            raise RuntimeError("JobActor.run before setup")
        return self._runner.run(job)

    def where(self) -> dict:
        import torch
        return {"pid": os.getpid(), "host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(),
                "torch_threads": torch.get_num_threads(), "omp_threads": os.environ.get("OMP_NUM_THREADS")}


RemoteJobActor = ray.remote(JobActor)


@dataclass(frozen=True)
class ActorResources:
    """What each actor asks of the scheduler."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None      # bytes reserved (Ray's logical `memory` resource); None: no reservation

    def options(self) -> dict:
        opts = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            # Spread actors over nodes: input read bandwidth is per node, so that is where throughput grows.
            "scheduling_strategy": "SPREAD",
            # A dead actor is replaced by the executor, which also re-runs its job; Ray must not retry.
            "max_restarts": 0,
            "max_task_retries": 0,
            "runtime_env": {"env_vars": dict(THREAD_ENV)},
        }
        if self.memory:
            opts["memory"] = int(self.memory)
        return opts

    def describe(self) -> str:
        mem = f", memory {self.memory / 2**30:.2f} GiB" if self.memory else ""
        return f"{self.num_cpus:g} CPU, {self.num_gpus:g} GPU{mem}"


@dataclass(eq=False)
class Slot:
    """One actor as the driver sees it: its handle, its setup call, the jobs queued on it (in order)."""

    handle: object
    setup_ref: object | None = None       # pending setup call; None once answered
    ready: bool = False
    where: dict = field(default_factory=dict)
    queue: list = field(default_factory=list)   # [(ref, job)], submission order = execution order

    @classmethod
    def start(cls, resources: ActorResources, ctx_ref) -> "Slot":
        handle = RemoteJobActor.options(**resources.options()).remote()
        return cls(handle=handle, setup_ref=handle.setup.remote(ctx_ref))

    def resetup(self, ctx_ref) -> None:
        self.ready = False
        self.setup_ref = self.handle.setup.remote(ctx_ref)

    def submit(self, job):
        ref = self.handle.run.remote(job)
        self.queue.append((ref, job))
        return ref

    def kill(self) -> None:
        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead or the cluster is gone: nothing left to stop
            pass

    def label(self) -> str:
        w = self.where
        return f"actor pid {w['pid']} on {w['host']}" if w else "actor (not started)"
