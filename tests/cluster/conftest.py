"""One local Ray instance for the test session (2 CPUs, no dashboard, a small object store, usage stats off,
listening on the loopback address only, token authentication on with a token made for the session), and
worker pools on it. Without Ray installed (`pip install -e '.[test,ray]'`), the tests that need it skip."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator

import pytest

from onnxq.cluster.backend import RayBackend
from onnxq.cluster.connect import LOOPBACK_ONLY_ENV
from onnxq.cluster.pool import WorkerPool, open_pool

# Before Ray is imported (it reads these once): the node resolves to 127.0.0.1 and every Ray server listens
# there only; no usage report; token authentication as Ray 2.59+ sets it up for a local instance, with a token
# of the session's own in the environment (inherited by the workers; no ~/.ray/auth_token is read or written).
os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))

SESSION_CPUS = 2


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """The session's Ray instance (the `ray` module, connected); stopped at the end of the session."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test,ray]'")
    ray.init(address="local", num_cpus=SESSION_CPUS, include_dashboard=False, object_store_memory=96 << 20,
             log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(ray_session: object) -> Iterator[WorkerPool]:
    """Two workers of one CPU each, shared by a module's tests."""
    with open_pool(RayBackend(workers=SESSION_CPUS)) as workers:
        yield workers
