"""Named crash points for the resume tests: `TADROP_FAULT=<point>` makes the driver SIGKILL itself there.

Resume must be byte-exact whatever the moment of death; these points hit the moments that matter
(after the plan, between two recorded jobs, inside the reduce). Unset, this costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def crash_point(point: str) -> None:
    """Die by SIGKILL (no cleanup, like the OOM killer) when TADROP_FAULT names this point.

    `name:N` dies on the N-th time the point is reached, e.g. `after_job:3`.
    """
    want = os.environ.get("TADROP_FAULT")
    if not want:
        return
    name, _, nth = want.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
