"""Worker processes started early: while the driver imports torch and plans, they import it too.

A local merge with workers used to start them once the plan was made: the driver imported torch
(~2 s), validated and planned, and only then did each worker start a fresh interpreter and import
torch (~2 s more, the driver idle).  `tadrop merge` now starts them first (`maybe_prestart`), before
the driver's own imports, and the executor adopts them (`take_prestarted`): the two imports overlap.
A worker learns its run context with its first job (`pipeline.executor`), so it can start before
the plan exists.

This module must stay light: it is imported before torch, and its functions are what the spawned
workers run first (pickled by reference, so importing them must not pull in torch in the driver).
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.context
import os
import signal
import sys
import threading
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Below this much input (all phases), jobs run in the driver: starting workers would cost more than
# they save.  TADROP_INLINE_BYTES overrides it (0: always workers, as the test suite does).
INLINE_MAX_BYTES = 256 * 10**6


def inline_limit() -> int:
    return int(os.environ.get("TADROP_INLINE_BYTES", INLINE_MAX_BYTES))


class _NoMainProcess(mp.context.SpawnProcess):
    """A spawned worker that does not re-import the driver's __main__.

    multiprocessing's spawn re-runs the main script in every child (as `__mp_main__`): a script
    without an `if __name__ == "__main__":` guard would start the merge again inside each worker
    (which then dies), and a script read from stdin cannot be re-run at all.  Our workers need
    nothing from __main__ (the job functions live in the pipeline package), so the preparation data
    is taken with a bare stand-in for __main__, and scripts, stdin and notebooks all work.
    """
    _blank_main = types.ModuleType("__main__")

    @staticmethod
    def _Popen(process_obj):
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = _NoMainProcess._blank_main
        try:
            return mp.context.SpawnProcess._Popen(process_obj)
        finally:
            if main is not None:
                sys.modules["__main__"] = main


class NoMainContext(mp.context.SpawnContext):
    Process = _NoMainProcess


@contextlib.contextmanager
def children_ignore_sigint():
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


def init_worker() -> None:
    """Pool initializer: what every job needs imported, before the first job (and its context) comes."""
    _die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pipeline.job  # noqa: F401  (torch, tadrop, the writers)


def _ready() -> int:
    return os.getpid()


def new_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes running `init_worker` (they start on the first submit)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=NoMainContext(), initializer=init_worker)


_prestarted: tuple[int, ProcessPoolExecutor] | None = None


def prestart(workers: int) -> None:
    """Start `workers` worker processes now; the next local executor with as many workers adopts them."""
    global _prestarted
    discard()
    pool = new_pool(workers)
    with children_ignore_sigint():
        for _ in range(workers):      # a task each: the pool spawns all of them at once
            pool.submit(_ready)
    _prestarted = (workers, pool)


def take_prestarted(workers: int) -> ProcessPoolExecutor | None:
    """The prestarted pool when it has `workers` processes (it is then the caller's), else None
    (a pool of another size is stopped)."""
    global _prestarted
    if _prestarted is None:
        return None
    n, pool = _prestarted
    _prestarted = None
    if n == workers:
        return pool
    stop(pool)
    return None


def stop(pool: ProcessPoolExecutor) -> None:
    for proc in list(getattr(pool, "_processes", {}).values()):   # stdlib keeps them here
        proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def discard() -> None:
    """Stop prestarted workers nobody adopted (the run needed none, or failed before its jobs)."""
    global _prestarted
    if _prestarted is not None:
        pool, _prestarted = _prestarted[1], None
        stop(pool)


def _local_input_bytes(cfg) -> int | None:
    """Bytes of safetensors the config's inputs hold on this machine; None when one is not a local path
    (a repo id, resolved later)."""
    total = 0
    for ref in [cfg.base, *[m.path if m.path is not None else m.adapter for m in cfg.models]]:
        if not isinstance(ref, Path):
            return None
        try:
            if ref.is_file():
                total += ref.stat().st_size
            elif ref.is_dir():
                total += sum(p.stat().st_size for p in ref.glob("*.safetensors"))
            else:
                return None
        except OSError:
            return None
    return total


def maybe_prestart(cfg) -> bool:
    """Prestart the workers a local merge of `cfg` will most likely use (same rules as the executor:
    no workers under the inline limit or with `workers: 1`; no more than this machine's cores or
    memory hold).  A guess: a pool of the wrong size is stopped, and one nobody adopts is discarded."""
    if cfg.executor != "local":
        return False
    nbytes = _local_input_bytes(cfg)
    limit = inline_limit()
    workers = int(cfg.workers)
    if nbytes is None or nbytes <= limit or (workers == 1 and limit > 0):
        return False
    prestart(min(workers, *machine_limits(cfg.memory_budget).values()))
    return True


def machine_limits(memory_budget: int) -> dict[str, int]:
    """How many local workers this machine holds: {reason: count}, by its cores and by its memory at
    `memory_budget` bytes a worker (`pipeline.run.cap_workers` adds the jobs left)."""
    limits = {"CPU cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else (os.cpu_count() or 1)}
    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        limits[f"memory at {memory_budget / 2**30:.3g} GiB a worker"] = max(1, mem // int(memory_budget))
    except (ValueError, OSError):
        pass
    return limits
