"""How jobs get run: the executor interface and the local multi-process executor.

The driver hands an executor a list of jobs (largest first) and a callback; the executor runs them on
workers that each hold one long-lived `JobRunner` (the K+1 checkpoints stay mmapped across jobs) and
calls back in the driver as each job finishes, so the driver can record it in the ledger at once.
`cluster.ray_executor.RayExecutor` implements the same interface on a Ray cluster.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import threading
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

from .job import Job, JobError, JobRunner, RunContext

OnResult = Callable[[Job, dict], None]


class WorkerLost(RuntimeError):
    """A worker process died (SIGKILL, out-of-memory kill) while running a job."""


class Executor(ABC):
    """Runs jobs somewhere and reports each result back to the driver, in completion order."""

    @abstractmethod
    def run(self, ctx: RunContext, jobs: Sequence[Job], on_result: OnResult) -> None:
        """Run every job; raise JobError (application error) or WorkerLost after stopping the rest."""

    def close(self) -> None:
        """Release workers; safe to call twice."""


    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# One runner per worker process, built by the pool initializer and reused for every job.
_RUNNER: JobRunner | None = None


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the driver dies, so a killed driver never
    leaves workers behind still writing into the run directory (or holding its terminal's pipes)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the driver died before we got here
        os._exit(1)


def _init_worker(ctx: RunContext) -> None:
    global _RUNNER
    _die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _RUNNER = JobRunner(ctx)


def _run_job(job: Job) -> dict:
    assert _RUNNER is not None
    return _RUNNER.run(job)


@contextlib.contextmanager
def _children_ignore_sigint():
    """Workers are spawned with SIGINT ignored (an ignored signal stays ignored across exec, and Python
    then installs no KeyboardInterrupt handler), so Ctrl-C reaches the driver alone, which stops them:
    no worker tracebacks, even while they are still importing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class LocalExecutor(Executor):
    """N worker processes on this machine, one torch thread each, a bounded window of jobs in flight.

    Workers are spawned (fresh interpreters: no inherited threads or locks) once per run and live
    until `close()`, across the phases of a run (they share one context).
    """

    def __init__(self, workers: int = 2, window: int | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.window = window or 2 * workers
        self._pool: ProcessPoolExecutor | None = None
        self._ctx: RunContext | None = None

    def _get_pool(self, ctx: RunContext, n_jobs: int) -> ProcessPoolExecutor:
        if self._pool is not None and self._ctx is not ctx:
            self.close()
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(ctx,))
            self._ctx = ctx
        return self._pool

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
                    with _children_ignore_sigint():   # submit spawns the workers, on demand
                        in_flight[pool.submit(_run_job, job)] = job
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for fut in done:
                    job = in_flight.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool as e:
                        raise WorkerLost(
                            f"a worker process died while running {job.describe()} "
                            "(killed, or out of memory: try a smaller memory_budget or fewer workers); "
                            "re-run the same command to resume"
                        ) from e
                    except JobError:
                        raise
                    except Exception as e:  # an error inside a worker that is not a JobError
                        raise JobError(f"{job.describe()}: {type(e).__name__}: {e}") from e
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
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._ctx = None
