"""What a Ray run asks for (`RayBackend`) and the data its workers read (`ShardedData`); no Ray import."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxq.errors import ConfigError

if TYPE_CHECKING:
    from onnxq.data.images import ImagePreprocess
    from onnxq.data.shards import Shard
    from onnxq.data.signature import ModelSignature
    from onnxq.data.sources import CalibSource

__all__ = ["RayBackend", "ShardedData", "LOCAL"]

#: ONNX Runtime execution providers that run on a GPU (a worker using one must reserve it from Ray).
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                           "MIGraphXExecutionProvider"})
#: `RayBackend.address` for a Ray instance started on this machine for the run (and stopped after it).
LOCAL = "local"


@dataclass(frozen=True)
class RayBackend:
    """Where and how wide work runs on Ray.

    Attributes:
        address: "local" (a new Ray instance on this machine for the run, stopped after it), "auto" (the
            cluster this machine belongs to: `ray start`, `ray job submit`) or "HOST:PORT" (a head's GCS
            address). An already connected driver (`ray.init` called by the caller) is used as it is.
        workers: actors (None: as many as the cluster's CPUs hold at `cpus_per_worker` each).
        cpus_per_worker: CPUs each actor reserves; its ONNX Runtime session and its folding threads use
            that many threads.
        gpus_per_worker: GPUs each actor reserves; only with a GPU execution provider in the config.
        shards_per_worker: the data is cut into about this many shards per worker: the load balances, and a
            worker that dies loses one shard's work.
        init: more `ray.init` keywords for a local instance (e.g. num_cpus, object_store_memory).
        env: environment variables of the worker processes (Ray's runtime_env env_vars).
        replacements: how many dead workers may be replaced in one run before it fails.
    """

    address: str = LOCAL
    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    shards_per_worker: int = 4
    init: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    replacements: int = 4

    def __post_init__(self) -> None:
        if not self.address or any(c.isspace() for c in self.address):
            raise ConfigError(f"--ray: '{self.address}' is neither auto nor HOST:PORT")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"--cpus-per-worker must be at least 1, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")
        if self.shards_per_worker < 1:
            raise ConfigError(f"shards_per_worker must be at least 1, got {self.shards_per_worker}")

    @property
    def local(self) -> bool:
        return self.address == LOCAL

    def check_providers(self, providers: tuple[str, ...]) -> None:
        """Refuse GPUs reserved for workers whose sessions would not use them, and GPU sessions without any
        reserved (Ray then hides every GPU from the worker)."""
        gpu = [name for name in providers if name in GPU_PROVIDERS]
        if self.gpus_per_worker and not gpu:
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker:g}: the sessions run on "
                              f"{', '.join(providers)}; give a GPU provider with --providers (e.g. cuda)")
        if gpu and not self.gpus_per_worker:
            raise ConfigError(f"--providers {', '.join(gpu)} on Ray needs GPUs reserved per worker: give "
                              "--gpus-per-worker (e.g. 1)")


@dataclass(frozen=True)
class ShardedData:
    """Calibration data that every worker opens its shard of: a path each node sees the same (shared storage),
    or a loader script (`loader.py:function`, which may read object-store URIs itself) given its shard.

    Attributes:
        path: as `open_source` takes it; made absolute, since workers do not share the driver's folder.
        preprocess: how images become tensors.
        max_samples: the first N samples only (then cut into shards).
    """

    path: str
    preprocess: ImagePreprocess | None = None
    max_samples: int | None = None

    @classmethod
    def at(cls, path: str | os.PathLike[str], preprocess: ImagePreprocess | None = None,
           max_samples: int | None = None) -> ShardedData:
        text = os.fspath(path)
        script, colon, function = text.partition(".py:")
        local = Path(script + ".py" if colon else text)
        if local.exists():
            text = os.fspath(local.resolve()) + (f":{function}" if colon else "")
        return cls(text, preprocess, max_samples)

    def open(self, signature: ModelSignature, shard: Shard | None = None) -> CalibSource:
        """The whole data (checked against the model), or one shard of it."""
        from onnxq.data.images import ImagePreprocess
        from onnxq.data.sources import open_source

        return open_source(self.path, signature, self.preprocess or ImagePreprocess(), self.max_samples, shard=shard)
