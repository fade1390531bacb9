"""Shards of the calibration data: a fixed partition of the sample indices, so that N machines (Slurm array
tasks, Kubernetes indexed jobs, Ray workers) each calibrate one part and `onnxq stats merge` gives exactly
the statistics of one run over all of it.

Shard i of N (0-based, written "i/N") holds samples `shard_ranges(total, N, unit)[i]`: consecutive ranges
whose boundaries are multiples of `unit`, the model's fixed batch size (1 when it takes any batch), so every
shard's batches are batches of the one-machine run. The last shard also gets the samples that do not fill a
batch (which a fixed-batch model leaves out either way).

How each kind of data is cut:
- array files: by sample ranges read from their headers along each input's own sample axis; files wholly
  outside the shard are never opened;
- image folders: a slice of the sorted file list (images outside the shard are never decoded);
- loader scripts: the function is called with `shard_index=i, num_shards=N` and chooses its own samples; one
  that takes no such arguments is refused.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from onnxq.errors import CalibrationError, ConfigError
from onnxq.data.signature import ModelSignature, SignedSource

__all__ = ["Shard", "shard_ranges", "shard_of", "loader_takes_shards"]

_SHARD_TEXT = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Shard:
    """Shard `index` of `count` (0-based): `str(shard)` is "index/count", its id in statistics files."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: the index must be 0 to {max(self.count, 1) - 1} "
                              "and the count at least 1 (shards are numbered from 0, e.g. 0/4 to 3/4)")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """"i/N" -> Shard(i, N); a ConfigError for anything else."""
        match = _SHARD_TEXT.match(text)
        if match is None:
            raise ConfigError(f"--shard: expected INDEX/COUNT such as 0/4 (shards are numbered from 0), got '{text}'")
        return cls(int(match.group(1)), int(match.group(2)))


def shard_ranges(total: int, count: int, unit: int = 1) -> tuple[range, ...]:
    """The partition of sample indices 0..total-1 into `count` consecutive ranges with boundaries at multiples
    of `unit`, as even as whole units allow; the last range also holds the `total % unit` samples left over.
    Ranges are empty when there are fewer whole units than shards."""
    if count < 1 or unit < 1 or total < 0:
        raise ValueError(f"shard_ranges({total}, {count}, {unit})")
    units = total // unit
    bounds = [index * units // count * unit for index in range(count)] + [total]
    return tuple(range(bounds[index], bounds[index + 1]) for index in range(count))


def loader_takes_shards(loader: Callable[..., Any]) -> bool:
    """True if `loader` accepts the keyword arguments `shard_index` and `num_shards` (or any keywords)."""
    try:
        parameters = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return True
    names = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)}
    return {"shard_index", "num_shards"} <= names


def shard_of(source: Any, shard: Shard, signature: ModelSignature, max_samples: int | None = None) -> SignedSource:
    """Shard `shard` of an array-file or image-folder source (of its first `max_samples` samples, if given):
    the source's `window(samples, shard, of)`, `of` describing what it is a shard of.

    Raises:
        CalibrationError: the shard would hold no samples (more shards than batches).
        ConfigError: the source cannot be cut into shards.
    """
    if not callable(getattr(source, "window", None)) or source.num_samples() is None:
        raise ConfigError(f"--shard: {source.describe()} cannot be cut into shards; use array files, an image "
                          "folder or a loader script that takes shard_index and num_shards")
    total = source.num_samples() if max_samples is None else min(source.num_samples(), max_samples)
    unit = signature.fixed_batch or 1
    window = shard_ranges(total, shard.count, unit)[shard.index]
    if len(window) < unit:
        batches = f" (the model takes batches of exactly {unit}: {total // unit} whole batches)" if unit > 1 else ""
        raise CalibrationError(f"shard {shard} of {source.describe()} holds no samples: {total} samples{batches} "
                               f"split {shard.count} ways; use at most {max(1, total // unit)} shards")
    of = None if total == source.num_samples() else f"the first {total} of {source.describe()}"
    return source.window(window, shard, of)
