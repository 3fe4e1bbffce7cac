"""Where the driver's Ray comes from: the process's own, a cluster to join, or a private local instance.

Three cases, in this order: Ray already initialised in this process (tests, notebooks) is reused and
left running; an address (the CLI's --ray-address, the config's `ray.address`, or $RAY_ADDRESS, which
`ray job submit` sets for the job's driver) is joined; otherwise a private instance is started with
`address="local"`, because a plain `ray.init(num_cpus=...)` fails when some other head already runs
on the machine. The start-up time is measured apart from the merge, since it is paid once per run.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import ray

from pipeline.executor import WorkerLost

log = logging.getLogger("tadrop")

# Only small things travel through the object store (the run context, result dicts), so a private
# instance needs little of it; the default (30% of RAM) would only shrink Ray's `memory` resource.
LOCAL_OBJECT_STORE = 256 * 2**20


class ClusterError(WorkerLost):
    """Ray cannot run the jobs: no connection, no actor could be placed, or an actor failed to set up."""


@dataclass(frozen=True)
class Connection:
    started: bool        # True when we called ray.init (so close() shuts it down / disconnects)
    seconds: float
    where: str


def connect(address: str | None, num_cpus: float) -> Connection:
    """Make sure this process is a Ray driver; `num_cpus` sizes a private instance only."""
    t0 = time.perf_counter()
    if ray.is_initialized():
        return Connection(False, 0.0, "the Ray instance already running in this process")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        if address.startswith(("http://", "https://")):
            raise ClusterError(
                f"Ray address {address!r} is a dashboard URL, which `ray job submit --address` takes; "
                "to join a cluster from a driver give the GCS address host:6379 (or 'auto', or ray://host:10001)")
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
        where = f"Ray cluster at {address}"
    else:
        cpus = max(1, math.ceil(num_cpus))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE, logging_level=logging.WARNING,
                 log_to_driver=True)
        where = f"private local Ray instance ({cpus} CPUs)"
    seconds = time.perf_counter() - t0
    log.info("ray: connected to the %s in %.2f s", where, seconds)
    return Connection(True, seconds, where)


def disconnect(conn: Connection | None) -> None:
    """Shut down what connect() started: stops a private instance, only disconnects from a cluster."""
    if conn is not None and conn.started and ray.is_initialized():
        t0 = time.perf_counter()
        ray.shutdown()
        log.info("ray: disconnected from the %s in %.2f s", conn.where, time.perf_counter() - t0)


def describe_resources() -> str:
    """What the cluster offers, for error messages about actors that cannot be placed."""
    try:
        total = ray.cluster_resources()
        free = ray.available_resources()
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return "(cluster resources unknown)"
    keys = ("CPU", "GPU", "memory")

    def fmt(d: dict) -> str:
        return ", ".join(f"{k}={_human(k, d.get(k, 0))}" for k in keys)

    return f"cluster total {fmt(total)}; free now {fmt(free)}"


def _human(key: str, value: float) -> str:
    return f"{value / 2**30:.1f}GiB" if key == "memory" else f"{value:g}"
