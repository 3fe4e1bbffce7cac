"""Named crash points for the resume tests: `TADROP_FAULT=<point>` makes the driver SIGKILL itself there.

Resume must be byte-exact whatever the moment of death; these points hit the moments that matter
(after the plan, between two recorded jobs, inside the reduce). Unset, this costs one dict lookup.
"""
from __future__ import annotations

import errno
import os
import signal
import time

_hits: dict[str, int] = {}


def write_fault() -> None:
    """`TADROP_FAULT=enospc:N`: the N-th and later output writes of a process fail as on a full disk
    (for machines where the tests cannot mount a small filesystem)."""
    want = os.environ.get("TADROP_FAULT", "")
    if not want.startswith("enospc"):
        return
    _hits["enospc"] = _hits.get("enospc", 0) + 1
    if _hits["enospc"] >= int(want.partition(":")[2] or 1):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _pause(point: str) -> None:
    """`TADROP_PAUSE=<point>[:N]` with `TADROP_PAUSE_FILE=F`: at that point the driver creates F.reached
    and waits while F exists (the concurrency tests hold a run mid-merge this way)."""
    want = os.environ.get("TADROP_PAUSE")
    name, _, nth = (want or "").partition(":")
    if name != point:
        return
    _hits["pause:" + point] = _hits.get("pause:" + point, 0) + 1
    if _hits["pause:" + point] != int(nth or 1):
        return
    flag = os.environ["TADROP_PAUSE_FILE"]
    open(flag + ".reached", "w").close()
    deadline = time.time() + 600
    while os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.02)


def crash_point(point: str) -> None:
    """Die by SIGKILL (no cleanup, like the OOM killer) when TADROP_FAULT names this point.

    `name:N` dies on the N-th time the point is reached, e.g. `after_job:3`.
    """
    _pause(point)
    want = os.environ.get("TADROP_FAULT")
    if not want:
        return
    name, _, nth = want.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def job_fault() -> None:
    """In a worker, at the start of a job: `TADROP_FAULT=worker_signal:SIG` kills the worker with that
    signal (e.g. KILL, SEGV), `worker_exit:CODE` exits with that code (how the driver words a dead worker)."""
    want = os.environ.get("TADROP_FAULT", "")
    if want.startswith("worker_signal:"):
        os.kill(os.getpid(), getattr(signal, "SIG" + want.partition(":")[2]))
    elif want.startswith("worker_exit:"):
        os._exit(int(want.partition(":")[2]))
