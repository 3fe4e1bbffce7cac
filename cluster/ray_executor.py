"""The pipeline's jobs on a Ray cluster: long-lived actors, a bounded window, re-runs on lost workers.

Each actor wraps one `JobRunner` and writes its own outputs to the shared filesystem; only the small
result dicts come back (the object store carries nothing bulky). Jobs go to the least-loaded ready
actor in the order given (largest first), at most `window` in flight. Jobs are idempotent (a re-run
rewrites the same byte ranges), so a job whose actor process died (SIGKILL, OOM kill, lost node) runs
again on a fresh actor, up to `max_retries` times; an application error (JobError) stops the run at
once, naming the tensor, and leaves it resumable: the driver's ledger holds every finished job.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import replace
from typing import Sequence

import ray
from ray import exceptions as rex

from pipeline.executor import Executor, OnResult, WorkerLost
from pipeline.job import Job, JobError, RunContext

from .actors import ActorResources, Slot
from .connect import ClusterError, Connection, connect, describe_resources, disconnect

log = logging.getLogger("tadrop")

# The actor process is gone (killed, out of memory, node lost): the job may be re-run elsewhere.
LOST = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError,
        rex.ObjectLostError)
# Ray's own per-process overhead (interpreter, torch, zarr) on top of the job's memory budget.
ACTOR_OVERHEAD = 512 * 2**20


class RayExecutor(Executor):
    """`Executor` on Ray actors; see the module docstring."""

    def __init__(self, actors: int = 2, *, resources: ActorResources | None = None,
                 address: str | None = None, window: int | None = None, max_retries: int = 3,
                 ready_timeout: float = 300.0):
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        self.actors = actors
        self.resources = resources or ActorResources()
        self.address = address
        self.window = window or 2 * actors
        self.max_retries = max_retries
        self.ready_timeout = ready_timeout
        self.timings: dict[str, float] = {}
        self._conn: Connection | None = None
        self._slots: list[Slot] = []
        self._ctx: RunContext | None = None
        self._ctx_ref = None
        self._t_actors: float | None = None

    @classmethod
    def from_config(cls, cfg) -> "RayExecutor":
        """From a `pipeline.config.MergeConfig`: actors = ray.actors or workers, memory from the budget."""
        r = cfg.ray
        num_gpus = r.num_gpus_per_actor
        if cfg.device == "cuda" and num_gpus == 0:
            num_gpus = 1.0  # device: cuda asks for a GPU per actor unless told how much to share
        address = getattr(cfg, "ray_address", None) or r.address
        return cls(r.actors or cfg.workers, address=address,
                   resources=ActorResources(num_cpus=r.num_cpus_per_actor, num_gpus=num_gpus,
                                            memory=cfg.memory_budget + ACTOR_OVERHEAD))

    # -- actors ---------------------------------------------------------------------------------------
    def _prepare(self, ctx: RunContext) -> None:
        """Connect, then hand the context to the live actors (or start them)."""
        if self._conn is None:
            self._conn = connect(self.address, self.actors * self.resources.num_cpus)
            self.timings["connect_s"] = round(self._conn.seconds, 3)
        device = "cuda" if self.resources.num_gpus > 0 else ctx.device
        ctx = replace(ctx, device=device, torch_threads=1)
        if self._slots and _same(ctx, self._ctx):
            return
        self._ctx, self._ctx_ref = ctx, ray.put(ctx)
        if not self._slots:
            self._t_actors = time.perf_counter()
            self.timings.pop("actors_first_s", None)
            self._slots = [Slot.start(self.resources, self._ctx_ref) for _ in range(self.actors)]
        else:
            for s in self._slots:
                s.resetup(self._ctx_ref)

    def _replace(self, slot: Slot) -> None:
        slot.kill()
        self._slots.remove(slot)
        self._slots.append(Slot.start(self.resources, self._ctx_ref))

    def _kill_all(self) -> None:
        for s in self._slots:
            s.kill()
        self._slots = []
        self._ctx = self._ctx_ref = None

    def close(self) -> None:
        if ray.is_initialized():
            self._kill_all()
        disconnect(self._conn)
        self._conn = None

    def actor_info(self) -> list[dict]:
        """Where each ready actor runs (pid, host, node, thread counts), as its setup reported."""
        return [dict(s.where) for s in self._slots if s.ready]

    def actor_pids(self) -> list[int]:
        return [w["pid"] for w in self.actor_info()]

    # -- the run --------------------------------------------------------------------------------------
    def run(self, ctx: RunContext, jobs: Sequence[Job], on_result: OnResult) -> None:
        if not jobs:
            return
        self._prepare(ctx)
        try:
            _Run(self, list(jobs), on_result).loop()
        except BaseException:
            self._kill_all()  # fail fast: nothing of this run keeps computing
            raise

    def _on_ready(self, slot: Slot) -> None:
        """Log start-up: when work can begin (first actor) and when the pool is complete."""
        if self._t_actors is None:
            return
        elapsed = round(time.perf_counter() - self._t_actors, 3)
        if "actors_first_s" not in self.timings:
            self.timings["actors_first_s"] = elapsed
            log.info("ray: first actor ready in %.2f s (%s each)", elapsed, self.resources.describe())
        if all(s.ready for s in self._slots):
            self.timings["actors_all_s"] = elapsed
            log.info("ray: all %d actors ready in %.2f s", len(self._slots), elapsed)
            self._t_actors = None


class _Run:
    """The dispatch loop of one `run` call."""

    def __init__(self, ex: RayExecutor, jobs: list[Job], on_result: OnResult):
        self.ex, self.on_result = ex, on_result
        self.todo: deque[Job] = deque(jobs)
        self.attempts: dict[str, int] = {}
        self.refs: dict = {}          # ObjectRef -> (slot, job | None); None marks a setup call
        self.depth = max(1, math.ceil(ex.window / ex.actors))
        self.waiting_since = time.monotonic()
        self.bare_deaths = 0
        for s in ex._slots:
            if s.setup_ref is not None:
                self.refs[s.setup_ref] = (s, None)

    def loop(self) -> None:
        while self.todo or any(job is not None for _, job in self.refs.values()):
            self._dispatch()
            self._check_starved()
            if not self.refs:  # cannot happen while a lost actor is always replaced; never wait on nothing
                raise ClusterError("no Ray actor left to run the remaining jobs")
            ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=self._wait_timeout())
            if not ready:
                continue
            ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
            self._collect(ready)

    def _dispatch(self) -> None:
        in_flight = sum(1 for _, job in self.refs.values() if job is not None)
        while self.todo and in_flight < self.ex.window:
            slots = [s for s in self.ex._slots if s.ready and len(s.queue) < self.depth]
            if not slots:
                return
            slot = min(slots, key=lambda s: len(s.queue))
            job = self.todo.popleft()
            self.refs[slot.submit(job)] = (slot, job)
            in_flight += 1

    def _wait_timeout(self) -> float | None:
        return None if any(s.ready for s in self.ex._slots) else 5.0

    def _check_starved(self) -> None:
        """No actor has started for ready_timeout seconds: the cluster cannot place one, say so."""
        if any(s.ready for s in self.ex._slots):
            self.waiting_since = time.monotonic()
            return
        if time.monotonic() - self.waiting_since > self.ex.ready_timeout:
            raise ClusterError(
                f"no Ray actor could start within {self.ex.ready_timeout:.0f} s; each asks for "
                f"{self.ex.resources.describe()}; {describe_resources()}. Lower memory_budget, "
                "ray.num_cpus_per_actor or ray.num_gpus_per_actor, or add nodes")

    def _collect(self, ready: list) -> None:
        """Handle finished calls: successes first (so a dead actor's finished work is kept)."""
        outcomes = []
        for ref in ready:
            slot, job = self.refs.pop(ref)
            try:
                outcomes.append((0, slot, job, ref, ray.get(ref)))
            except LOST as e:
                outcomes.append((2, slot, job, ref, e))
            except rex.RayTaskError as e:
                outcomes.append((1, slot, job, ref, e))
            except rex.RayError as e:  # runtime env failed, actor unschedulable, ...: not the job's fault
                outcomes.append((3, slot, job, ref, e))
        outcomes.sort(key=lambda o: o[0])
        dead: list[Slot] = []
        for kind, slot, job, ref, value in outcomes:
            if kind == 0:
                self._success(slot, job, ref, value)
            elif kind == 1:
                self._app_error(job, value)
            elif kind == 3:
                raise ClusterError(f"Ray could not run {job.describe() if job else 'an actor'}: "
                                   f"{_first_line(value)}") from None
            elif slot not in dead:
                dead.append(slot)
                self._lost(slot, value)

    def _success(self, slot: Slot, job: Job | None, ref, value) -> None:
        if job is None:  # a setup call answered: the actor is placed and holds the context
            slot.setup_ref, slot.ready, slot.where = None, True, value
            self.ex._on_ready(slot)
            return
        slot.queue = [(r, j) for r, j in slot.queue if r != ref]
        self.on_result(job, value)

    def _app_error(self, job: Job | None, err: rex.RayTaskError) -> None:
        cause = getattr(err, "cause", None)
        if job is None:
            raise ClusterError(f"a Ray actor failed to set up the run: {_message(cause, err)}") from None
        if isinstance(cause, JobError):
            raise JobError(str(cause)) from None
        raise JobError(f"{job.describe()}: {_message(cause, err)}") from None

    def _lost(self, slot: Slot, err: Exception) -> None:
        """The actor died: re-queue its jobs (first the one it was running), start a fresh actor."""
        for ref, _ in slot.queue:
            self.refs.pop(ref, None)
        if slot.setup_ref is not None:
            self.refs.pop(slot.setup_ref, None)
        jobs = [j for _, j in slot.queue]
        if jobs:
            running = jobs[0]
            n = self.attempts[running.id] = self.attempts.get(running.id, 0) + 1
            if n > self.ex.max_retries:
                raise WorkerLost(
                    f"{running.describe()} lost its Ray actor {n} times (killed, or out of memory: try a "
                    f"smaller memory_budget); last: {_first_line(err)}; re-run the same command to resume")
            log.warning("ray: %s died while running %s (%s); re-running it on a fresh actor (retry %d of %d)",
                        slot.label(), running.describe(), _first_line(err), n, self.ex.max_retries)
        else:
            self.bare_deaths += 1
            if self.bare_deaths > 3 * self.ex.actors:
                raise ClusterError(f"Ray actors keep dying before they run anything; last: {_first_line(err)}")
            log.warning("ray: %s died (%s); starting a fresh one", slot.label(), _first_line(err))
        self.todo.extendleft(reversed(jobs))
        self.ex._replace(slot)
        fresh = self.ex._slots[-1]
        self.refs[fresh.setup_ref] = (fresh, None)


def _same(a: RunContext, b: RunContext | None) -> bool:
    if b is None:
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a field that cannot compare: treat as changed
        return False


def _message(cause: BaseException | None, err: BaseException) -> str:
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
