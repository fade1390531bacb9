"""Shards of the calibration data (`onnxq.data.shards`): every sample in exactly one shard, in order, with
fixed batches kept whole, for array files, image folders and loader scripts; and sharded statistics merge
into exactly the one-run statistics on a real model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper

from onnxq.calib.stats_file import StatsFile, merge_stats
from onnxq.calib.calibrate import full_batches
from onnxq.config import QuantConfig
from onnxq.data.shards import Shard, shard_ranges
from onnxq.data.signature import ModelSignature, signature_of
from onnxq.data.sources import open_source
from onnxq.errors import CalibrationError, ConfigError
from onnxq.pipeline import collect_stats
from tests.support.paths import MODELS


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 500), count=st.integers(1, 40), unit=st.integers(1, 16))
def test_shard_ranges_cover_every_sample_once_in_whole_units(total: int, count: int, unit: int) -> None:
    ranges = shard_ranges(total, count, unit)
    assert len(ranges) == count
    assert [i for r in ranges for i in r] == list(range(total))
    assert all(r.start % unit == 0 for r in ranges)
    assert all(len(r) % unit == 0 for r in ranges[:-1])
    whole = [len(r) // unit for r in ranges[:-1]] + [(len(ranges[-1]) - total % unit) // unit]
    assert max(whole) - min(whole) <= 1  # as even as whole units allow


def test_shard_text() -> None:
    assert Shard.parse(" 2/5 ") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    for bad in ("5/5", "1", "-1/4", "a/b", "1/0", "0/-2"):
        with pytest.raises(ConfigError, match="shard"):
            Shard.parse(bad)


def _labelled_files(folder: Path, vad_feed: Callable[..., dict], sizes: list[int]) -> Path:
    folder.mkdir()
    first = 0
    for index, size in enumerate(sizes):
        np.savez(folder / f"part{index}.npz", **vad_feed(size, first))
        first += size
    return folder


@pytest.mark.parametrize("count", [1, 2, 3, 7, 16])
def test_array_file_shards_hold_every_sample_once_in_order(tmp_path: Path, silero_signature: ModelSignature,
                                                           vad_feed, vad_labels, count: int) -> None:
    # Silero's state holds its samples on axis 1; files of uneven sizes, cut across file boundaries
    folder = _labelled_files(tmp_path / "calib", vad_feed, [5, 1, 7, 3])
    union: list[int] = []
    for index in range(count):
        shard = open_source(folder, silero_signature, shard=Shard(index, count))
        labels = vad_labels(shard.batches(4))
        assert len(labels) == shard.num_samples() and f"shard {index}/{count}" in shard.describe()
        union += labels
    assert union == list(range(16))


def test_max_samples_then_shards(tmp_path: Path, silero_signature: ModelSignature, vad_feed, vad_labels) -> None:
    folder = _labelled_files(tmp_path / "calib", vad_feed, [6, 6])
    parts = [vad_labels(open_source(folder, silero_signature, max_samples=9, shard=Shard(i, 2)).batches(8))
             for i in range(2)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    described = open_source(folder, silero_signature, max_samples=9, shard=Shard(1, 2)).describe()
    assert described.startswith("shard 1/2 (samples 4-8) of the first 9 of 12 samples in"), described


def _fixed_batch_signature(batch: int) -> ModelSignature:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return signature_of(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_fixed_batch_shards_are_whole_batches_of_the_one_run(tmp_path: Path) -> None:
    signature = _fixed_batch_signature(4)
    values = np.repeat(np.arange(23, dtype=np.float32)[:, None], 2, axis=1)  # 5 batches of 4, 3 samples left over
    np.save(tmp_path / "x.npy", values)

    def batches(source) -> list[list[int]]:
        return [feed["x"][:, 0].astype(int).tolist() for feed in source.batches(signature.batch_size(8))
                if signature.samples_in(feed) == 4]  # what `full_batches` keeps

    one_run = batches(open_source(tmp_path / "x.npy", signature))
    for count in (2, 3, 5):
        sharded = [b for i in range(count) for b in batches(open_source(tmp_path / "x.npy", signature,
                                                                        shard=Shard(i, count)))]
        assert sharded == one_run, count
    with pytest.raises(CalibrationError, match=r"shard 0/6 .* holds no samples.*batches of exactly 4.*at most 5"):
        open_source(tmp_path / "x.npy", signature, shard=Shard(0, 6))


def test_image_folder_shards_slice_the_sorted_files(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((MODELS / "data" / "photos" / "calib").iterdir())[:5]:
        shutil.copy(path, folder / path.name)
    signature = signature_of(onnx.load(MODELS / "efficientnet_lite0.onnx"))
    whole = np.concatenate([feed["images"] if "images" in feed else next(iter(feed.values()))
                            for feed in open_source(folder, signature).batches(8)])
    parts = [open_source(folder, signature, shard=Shard(i, 2)) for i in range(2)]
    assert [p.num_samples() for p in parts] == [2, 3]
    sharded = np.concatenate([next(iter(feed.values())) for p in parts for feed in p.batches(8)])
    assert np.array_equal(sharded, whole)


def test_loader_scripts_get_the_shard_or_are_refused(tmp_path: Path, silero_signature: ModelSignature,
                                                     vad_feed, vad_labels) -> None:
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def make(i):\n"
        "    return {'input': np.full((1, 512), i, np.float32), 'state': np.full((2, 1, 128), 0, np.float32),\n"
        "            'sr': np.array(16000, np.int64)}\n"
        "def sharded(shard_index=0, num_shards=1):\n"
        "    for i in range(shard_index, 10, num_shards):\n"
        "        yield make(i)\n"
        "def plain():\n"
        "    yield make(0)\n")
    labels = [feed["input"][:, 0].astype(int).tolist()
              for feed in open_source(f"{script}:sharded", silero_signature, shard=Shard(1, 3)).batches(8)]
    assert labels == [[1, 4, 7]]
    with pytest.raises(ConfigError, match=r"--shard 1/3: .*loader.py:plain takes no shard_index and num_shards"):
        open_source(f"{script}:plain", silero_signature, shard=Shard(1, 3))
    with pytest.raises(ConfigError, match="--max-samples cannot be combined with --shard for a loader script"):
        open_source(f"{script}:sharded", silero_signature, max_samples=3, shard=Shard(0, 3))


def test_sharded_statistics_merge_into_the_one_run_bit_for_bit() -> None:
    model = onnx.load(MODELS / "ppocr_mobile_v2_cls.onnx")
    data = MODELS / "data" / "textlines" / "ppocr_cls_calib.npz"
    config = QuantConfig(target="trt")
    one_run, _ = collect_stats(model, data, config)
    signature = signature_of(model)
    parts = [collect_stats(model, open_source(data, signature, shard=Shard(i, 3)), config)[0] for i in range(3)]
    assert [p.shards for p in parts] == [("0/3",), ("1/3",), ("2/3",)]
    merged = merge_stats(merge_stats(parts[2], parts[0]), parts[1])  # any order
    assert merged.shards == ("0/3", "1/3", "2/3") and merged.missing_shards() == ()
    assert merged.samples == one_run.samples == 64
    assert merged.histograms.keys() == one_run.histograms.keys()
    assert all(merged.histograms[name] == one_run.histograms[name] for name in one_run.histograms)


def test_merging_the_same_shard_twice_or_other_partitions_is_refused() -> None:
    def part(*shards: str) -> StatsFile:
        return StatsFile("digest", 1, 1, {}, (), shards)

    with pytest.raises(CalibrationError, match="shard 1/4 is in both files"):
        merge_stats(part("0/4", "1/4"), part("1/4"))
    with pytest.raises(CalibrationError, match="different partitions"):
        merge_stats(part("0/4"), part("1/3"))
    assert merge_stats(part("0/4"), part("2/4")).missing_shards() == ("1/4", "3/4")


def test_full_batches_of_a_shard_match_the_one_run_for_a_dynamic_batch(tmp_path: Path, silero_signature,
                                                                      vad_feed, vad_labels) -> None:
    # batching inside a shard starts afresh; the samples (and so the statistics) are the same
    folder = _labelled_files(tmp_path / "calib", vad_feed, [9])
    graph_free = [vad_labels(full_batches(open_source(folder, silero_signature, shard=Shard(i, 2)), None, 4,
                                          signature=silero_signature)) for i in range(2)]
    assert graph_free == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
