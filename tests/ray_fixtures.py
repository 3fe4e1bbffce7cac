"""One private Ray instance per test session (num_cpus=2), shared by every Ray test module.

Import the fixture into a test module (`from ray_fixtures import ray_session`). `address="local"`
starts a private instance even when another Ray head runs on the machine; the executor finds Ray
already initialised and reuses it, so each test pays only for its actors, not for a cluster start.
"""
from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=128 * 2**20, logging_level=logging.WARNING)
    yield ray
    if started:
        ray.shutdown()
