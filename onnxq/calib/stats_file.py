"""Calibration statistics as a file: collect once, choose amax with any method later, merge shards.

Format (`.npz`, read with `allow_pickle=False`, so loading never runs code):
    meta            uint8 array holding UTF-8 JSON: format, version, model digest, samples, batches,
                    num_bins, the tensor names in order, (when any) the rewrites the graph went
                    through before collecting (e.g. cross-layer equalization), which a run must repeat,
                    and (for shards of the data, see onnxq.data.shards) the shard ids "i/N" it holds
    t<i>/<field>    the i-th tensor's histogram as plain numeric arrays (Histogram.to_arrays)
The model digest (SHA-256 of the main graph's nodes and weights) ties the statistics to one model:
merging or quantizing with statistics of another model is refused, and so is merging two files that
hold the same shard (its samples would count twice).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import onnxq.mapped_weights as mapped_weights
from onnxq.atomic import write_atomic
from onnxq.errors import CalibrationError, ConfigError
from onnxq.calib.histogram import Histogram

__all__ = ["StatsFile", "model_digest", "save_stats", "load_stats", "merge_stats"]

FORMAT = "onnxq-stats"
VERSION = 1


@dataclass(frozen=True)
class StatsFile:
    """Histograms of a model's planned activations over `samples` calibration samples, collected on the
    prepared graph after `rewrites` (descriptions of data-free rewrite steps, e.g. equalization)."""

    model_digest: str
    samples: int
    batches: int
    histograms: Mapping[str, Histogram]
    rewrites: tuple[str, ...] = ()
    shards: tuple[str, ...] = ()  # the shard ids ("i/N") whose samples these are; () for unsharded data

    def missing_shards(self) -> tuple[str, ...]:
        """Shard ids of the same partition that these statistics lack (() when complete or unsharded)."""
        counts = {int(shard.split("/")[1]) for shard in self.shards}
        return tuple(f"{index}/{count}" for count in sorted(counts) for index in range(count)
                     if f"{index}/{count}" not in self.shards)

    @property
    def num_bins(self) -> int:
        return next(iter(self.histograms.values())).num_bins if self.histograms else 0


def model_digest(model: onnx.ModelProto) -> str:
    """SHA-256 over the main graph's nodes, inputs and initializers (name, type, shape, bytes)."""
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for value in model.graph.input:
        digest.update(value.SerializeToString(deterministic=True))
    for tensor in model.graph.initializer:
        digest.update(tensor.name.encode())
        if mapped_weights.is_mapped(tensor):  # a large model's weight left in its file: the same bytes
            values = mapped_weights.mapped_array(tensor)
            digest.update(values.reshape(-1).view(np.uint8))
            mapped_weights.release_pages(values)
        else:
            digest.update(np.asarray(onnx.numpy_helper.to_array(tensor)).tobytes())
    return digest.hexdigest()


def save_stats(stats: StatsFile, path: str | os.PathLike[str]) -> Path:
    """Write `stats` atomically (temporary file in the target folder, then rename)."""
    path = Path(path)
    names = list(stats.histograms)
    meta = {"format": FORMAT, "version": VERSION, "model_digest": stats.model_digest, "samples": stats.samples,
            "batches": stats.batches, "num_bins": stats.num_bins, "tensors": names}
    if stats.rewrites:
        meta["rewrites"] = list(stats.rewrites)
    if stats.shards:
        meta["shards"] = list(stats.shards)
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for i, name in enumerate(names):
        for field, values in stats.histograms[name].to_arrays().items():
            arrays[f"t{i}/{field}"] = values
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue(), "the statistics file", CalibrationError)
    return path


def _read_meta(path: Path, archive: Mapping[str, np.ndarray]) -> dict:
    try:
        meta = json.loads(bytes(archive["meta"]).decode())
    except (KeyError, ValueError) as err:
        raise CalibrationError(f"{path}: not an onnxq statistics file ({err})") from None
    if meta.get("format") != FORMAT:
        raise CalibrationError(f"{path}: not an onnxq statistics file")
    if meta.get("version") != VERSION:
        raise CalibrationError(f"{path}: statistics format version {meta.get('version')}; this onnxq reads {VERSION}")
    return meta


def load_stats(path: str | os.PathLike[str]) -> StatsFile:
    """Read a statistics file written by `save_stats` (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: no such statistics file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = _read_meta(path, archive)
            histograms = {}
            for i, name in enumerate(meta["tensors"]):
                prefix = f"t{i}/"
                fields = {k[len(prefix):]: archive[k] for k in archive.files if k.startswith(prefix)}
                histograms[name] = Histogram.from_arrays(fields)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise CalibrationError(f"{path}: unreadable statistics file ({str(err).splitlines()[0]})") from None
    return StatsFile(meta["model_digest"], int(meta["samples"]), int(meta["batches"]), histograms,
                     tuple(meta.get("rewrites", ())), _shard_ids(path, meta.get("shards", [])))


def _shard_ids(path: Path, ids: object) -> tuple[str, ...]:
    from onnxq.data.shards import Shard  # no cycle: shards imports no calibration module

    if not isinstance(ids, list):
        raise CalibrationError(f"{path}: unreadable statistics file (shards is not a list)")
    try:
        return tuple(str(Shard.parse(str(text))) for text in ids)
    except ConfigError as err:
        raise CalibrationError(f"{path}: unreadable statistics file (shard ids: {err})") from None


def merge_stats(first: StatsFile, second: StatsFile, what: str = "statistics") -> StatsFile:
    """Exact merge of two shards: equal to one pass over both shards' samples."""
    if first.model_digest != second.model_digest:
        raise CalibrationError(f"{what}: collected for different models (digests {first.model_digest[:12]}… "
                               f"and {second.model_digest[:12]}…)")
    if first.rewrites != second.rewrites:
        raise CalibrationError(f"{what}: collected after different rewrites ({list(first.rewrites)} and "
                               f"{list(second.rewrites)})")
    if set(first.histograms) != set(second.histograms):
        missing = sorted(set(first.histograms) ^ set(second.histograms))
        raise CalibrationError(f"{what}: the shards cover different tensors (e.g. '{missing[0]}')")
    if first.num_bins != second.num_bins:
        raise CalibrationError(f"{what}: {first.num_bins} vs {second.num_bins} histogram bins")
    twice = sorted(set(first.shards) & set(second.shards))
    if twice:
        raise CalibrationError(f"{what}: shard {twice[0]} is in both files; its samples would count twice")
    counts = {shard.split("/")[1] for shard in first.shards + second.shards}
    if len(counts) > 1:
        raise CalibrationError(f"{what}: the files come from different partitions of the data "
                               f"({', '.join(sorted(first.shards + second.shards))}); shard with one count N")
    merged = {name: h.merge(second.histograms[name]) for name, h in first.histograms.items()}
    shards = tuple(sorted(first.shards + second.shards, key=lambda shard: int(shard.split("/")[0])))
    return StatsFile(first.model_digest, first.samples + second.samples, first.batches + second.batches, merged,
                     first.rewrites, shards)
