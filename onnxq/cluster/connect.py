"""Joining Ray: `import_ray` (the optional extra, or a one-line error naming it) and `Cluster`.

Token authentication (Ray 2.52+; 2.59+ turns it on by default for a local `ray.init` instance): a local
instance this module starts uses Ray's default, a token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token (Ray generates the last when none exists). Joining with "auto" sends the token when one
is available, as `ray.init(address="auto")` does; Ray never sends it to an explicit HOST:PORT unless
RAY_AUTH_MODE=token is set (it then fails to connect), so that failure is reported with this hint. Ray reads all of these from
the environment of the driver; onnxq passes none of them itself.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType, TracebackType
from typing import Any

from onnxq.cluster.backend import RayBackend
from onnxq.errors import ClusterError, MissingDependencyError, first_line

__all__ = ["Cluster", "import_ray", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'onnxq[ray]'"
#: Ray's switch for clusters on Windows and macOS; "0" makes any platform resolve its node to the loopback address.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray(local: bool = False) -> ModuleType:
    """The `ray` module, or MissingDependencyError naming the extra that installs it.

    `local`: the caller will start a Ray instance for this machine alone. Imported here first, Ray then
    resolves the node's address to the loopback one (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's
    single-machine mode), so that the instance listens on 127.0.0.1 only: with Ray's default, its servers
    listen on every interface even when asked for 127.0.0.1 (Ray 2.60).
    """
    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(f"the Ray backend (--ray) needs Ray, which is not installed: {INSTALL_HINT}") \
            from None
    return ray


class Cluster:
    """A connection to Ray for one run: a local instance started (and stopped on exit), a cluster joined (and
    left), or the caller's existing connection (left alone).

    Attributes (once entered):
        ray: the ray module.
        started: whether this object started the Ray instance it stops.
    """

    def __init__(self, backend: RayBackend) -> None:
        self.backend = backend
        self.ray: Any = None
        self.started = self.joined = False

    def __enter__(self) -> Cluster:
        ray = self.ray = import_ray(self.backend.local)
        if not ray.is_initialized():
            self._connect(ray)
        return self

    def _connect(self, ray: Any) -> None:
        backend = self.backend
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.ERROR, "configure_logging": False}
        if backend.local:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from a run's own instance
            options.update(backend.init)
        where = "a local Ray instance" if backend.local else f"the Ray cluster at {backend.address}"
        try:
            ray.init(address=backend.address, **options)
        except ray.exceptions.AuthenticationError as err:
            raise ClusterError(f"{where} refused the connection: token authentication ({first_line(err)}). Hint: "
                               "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or "
                               "~/.ray/auth_token; `ray get-auth-token` on the head prints it)") from None
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
            hint = ("; if it uses token authentication, set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
                    "(Ray sends none to an explicit address otherwise)"
                    if not backend.local and backend.address != "auto" and os.environ.get("RAY_AUTH_MODE") != "token"
                    else "")
            raise ClusterError(f"cannot reach {where}: {first_line(err)}{hint}") from None
        self.started, self.joined = backend.local, True

    def close(self) -> None:
        """Leave the cluster (stopping the local instance this object started); idempotent."""
        if self.joined:
            self.joined = self.started = False
            self.ray.shutdown()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
