"""How jobs get run: the executor interface and the local multi-process executor.

The driver hands an executor a list of jobs (largest first) and a callback; the executor runs them on
workers that each hold one long-lived `JobRunner` (the K+1 checkpoints stay mmapped across jobs) and
calls back in the driver as each job finishes, so the driver can record it in the ledger at once.
`cluster.ray_executor.RayExecutor` implements the same interface on a Ray cluster.
"""
from __future__ import annotations

import os
import pickle
import signal
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Sequence

import torch

from .job import Job, JobError, JobRunner, RunContext
from .warm import children_ignore_sigint, inline_limit, new_pool, stop, take_prestarted

OnResult = Callable[[Job, dict], None]


class WorkerLost(RuntimeError):
    """A worker process died (a signal, an exit, an out-of-memory kill) while running a job."""


class Executor(ABC):
    """Runs jobs somewhere and reports each result back to the driver, in completion order."""

    # set by the driver: a one-line description of what the executor is doing (e.g. starting workers)
    on_status: Callable[[str], None] | None = None
    # its workers write on this machine's file systems, so the driver can fsync their outputs itself
    # (RunContext.sync_in_driver) while they go on computing
    driver_syncs: bool = False

    def status(self, text: str) -> None:
        if self.on_status is not None:
            self.on_status(text)

    @abstractmethod
    def run(self, ctx: RunContext, jobs: Sequence[Job], on_result: OnResult) -> None:
        """Run every job; raise JobError (application error) or WorkerLost after stopping the rest."""

    def close(self) -> None:
        """Release workers; safe to call twice."""


    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# One runner per worker process, built from the run context its first job names and reused for every
# job of that context (a pool outlives a phase and may serve a new context: the next run's).
_RUNNER: JobRunner | None = None
_TOKEN: tuple[str, str] | None = None


def _run_job(job: Job, token: tuple[str, str]) -> dict:
    """token: (path of the pickled RunContext, its key).  The context travels once per worker through a
    file rather than with every job, and the workers can start before it exists (`pipeline.warm`)."""
    global _RUNNER, _TOKEN
    if _TOKEN != token:
        with open(token[0], "rb") as f:
            ctx = pickle.load(f)
        _RUNNER, _TOKEN = JobRunner(ctx), token
    return _RUNNER.run(job)


def local_executor(workers: int, input_bytes: int) -> "Executor":
    """The local executor for a run of this size: in the driver when small or `workers: 1`."""
    limit = inline_limit()
    if input_bytes <= limit or (workers == 1 and limit > 0):
        return InlineExecutor()
    return LocalExecutor(workers=workers)


class InlineExecutor(Executor):
    """Runs the jobs one after another in the driver process: no worker start-up (each spawned
    worker pays a fresh interpreter and a torch import, seconds on a small machine), which is what
    a small merge is mostly made of.  Same JobRunner, same bytes; one torch thread while it runs
    (restored afterwards, so a notebook's settings survive)."""

    def __init__(self):
        self._runner: JobRunner | None = None
        self._ctx: RunContext | None = None

    def run(self, ctx: RunContext, jobs: Sequence[Job], on_result: OnResult) -> None:
        if not jobs:
            return
        threads = torch.get_num_threads()
        try:
            if self._runner is None or self._ctx is not ctx:
                self.close()
                self._runner, self._ctx = JobRunner(ctx), ctx
            self.status("merge (in this process)")
            for job in jobs:
                on_result(job, self._runner.run(job))
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        if self._runner is not None:
            for w in (self._runner.merged_writer, self._runner.unified_writer):
                if w is not None:
                    w.close()
            self._runner = self._ctx = None


def _oom_kills() -> dict[str, int]:
    """The kernel's out-of-memory kill counters we can read: system-wide and our cgroup's."""
    out = {}
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                out["system"] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    try:
        rel = next(l[3:] for l in Path("/proc/self/cgroup").read_text().splitlines() if l.startswith("0::"))
        for line in (Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.events").read_text().splitlines():
            if line.startswith("oom_kill "):
                out["cgroup"] = int(line.split()[1])
    except (OSError, ValueError, StopIteration):
        pass
    return out


def death_cause(exitcode: int | None, oom_before: dict, oom_after: dict) -> str:
    """How a worker died, in words: the exit code or signal; out of memory only when the kernel
    counted an OOM kill meanwhile."""
    if exitcode is None:
        return "stopped responding"
    if exitcode >= 0:
        return (f"exited with code {exitcode}" + (" (its start-up failed: see the traceback above)"
                                                   if exitcode == 0 else ""))
    sig = -exitcode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    what = f"was killed by {name} (signal {sig})"
    if sig != signal.SIGKILL:
        return what
    grew = [k for k in oom_after if oom_after[k] > oom_before.get(k, oom_after[k])]
    if grew:
        return (f"{what} by the kernel's out-of-memory killer: lower memory_budget or workers "
                "(workers x (memory_budget + 0.25 GiB) and the driver must fit in RAM)")
    if oom_after:
        return f"{what}, not by the out-of-memory killer (the kernel counted no OOM kill meanwhile)"
    return f"{what} (this system does not say whether it was the out-of-memory killer: see `dmesg`)"


CONTEXT_PREFIX = "worker-context-"


class LocalExecutor(Executor):
    """N worker processes on this machine, one torch thread each, a bounded window of jobs in flight.

    Workers are spawned (fresh interpreters: no inherited threads or locks) once per executor, or
    adopted from `pipeline.warm.prestart` (started before the driver imported torch), and live until
    `close()`, across the phases of a run.  Each run context is pickled once into a temporary file
    that the jobs name; a worker loads it with the first job that names it.
    """

    driver_syncs = True

    def __init__(self, workers: int = 2, window: int | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.window = window or 2 * workers
        self._pool: ProcessPoolExecutor | None = None
        self._ctx: RunContext | None = None
        self._token: tuple[str, str] | None = None
        self._oom = _oom_kills()
        self.timings: dict[str, float] = {}

    def _get_pool(self, ctx: RunContext, n_jobs: int) -> ProcessPoolExecutor:
        if self._pool is None:
            self._t_start = time.perf_counter()
            self._pool = take_prestarted(self.workers)
            n = self.workers if self._pool is not None else min(self.workers, n_jobs)
            self.status(f"starting {n} worker process{'es' if n > 1 else ''} (each imports torch)")
            if self._pool is None:
                self._pool = new_pool(self.workers)
        if self._ctx is not ctx:
            self._drop_context()
            key = uuid.uuid4().hex
            self._ctx, self._token = ctx, (self._write_context(ctx, key), key)
        return self._pool

    @staticmethod
    def _write_context(ctx: RunContext, key: str) -> str:
        """The pickled context, in the run's state directory (one run holds it: a file a killed
        driver left there is removed by the next run), else in the system's temporary directory."""
        blob = pickle.dumps(ctx, protocol=pickle.HIGHEST_PROTOCOL)
        state = Path(ctx.state_dir)
        try:
            for old in state.glob(CONTEXT_PREFIX + "*.pkl"):
                old.unlink()
            fd, path = tempfile.mkstemp(prefix=CONTEXT_PREFIX, suffix=".pkl", dir=state)
        except OSError:
            fd, path = tempfile.mkstemp(prefix="tadrop-" + CONTEXT_PREFIX, suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        return path

    def _drop_context(self) -> None:
        if self._token is not None:
            try:
                os.unlink(self._token[0])
            except OSError:
                pass
        self._ctx = self._token = None

    def _lost(self, job: Job) -> WorkerLost:
        """Word a broken pool by what really happened to the worker that died."""
        procs = list(getattr(self._pool, "_processes", {}).values())   # stdlib keeps them here
        deadline = time.time() + 5
        for p in procs:    # the pool terminates the survivors (SIGTERM); let every exit code settle
            p.join(max(0.0, deadline - time.time()))
        codes = [(p.pid, p.exitcode) for p in procs]
        dead = [c for c in codes if c[1] not in (-signal.SIGTERM, None)] or codes or [(None, None)]
        pid, code = dead[0]
        cause = death_cause(code, self._oom, _oom_kills())
        return WorkerLost(f"worker process {pid} {cause} while running {job.describe()}; "
                          "re-run the same command to resume")

    def run(self, ctx: RunContext, jobs: Sequence[Job], on_result: OnResult) -> None:
        if not jobs:
            return
        pool = self._get_pool(ctx, len(jobs))
        todo = list(jobs)
        in_flight: dict[Future, Job] = {}
        try:
            while todo or in_flight:
                while todo and len(in_flight) < self.window:
                    job = todo.pop(0)
                    with children_ignore_sigint():   # submit spawns the workers, on demand
                        in_flight[pool.submit(_run_job, job, self._token)] = job
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for fut in done:
                    job = in_flight.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool as e:
                        raise self._lost(job) from e
                    except JobError:
                        raise
                    except Exception as e:  # an error inside a worker that is not a JobError
                        raise JobError(f"{job.describe()}: {type(e).__name__}: {e}") from e
                    if "first_result_s" not in self.timings:   # worker start-up + the first job
                        self.timings["first_result_s"] = round(time.perf_counter() - self._t_start, 3)
                        self.status("merge")
                    on_result(job, result)
        except BaseException as e:
            for fut in in_flight:
                fut.cancel()
            if isinstance(e, KeyboardInterrupt):   # workers ignore SIGINT: stop them (resume redoes their jobs)
                for proc in list(getattr(self._pool, "_processes", {}).values()):
                    proc.terminate()
            self.close()
            raise

    def close(self) -> None:
        if self._pool is not None:
            # Every result the ledger holds is durable before it is reported, so a worker has nothing
            # left to save: stopping it now spares the wait for its orderly exit (unmapping inputs,
            # freeing buffers, interpreter teardown: about half a second at the end of every run).
            stop(self._pool)
            self._pool = None
        self._drop_context()
