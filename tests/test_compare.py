"""Tests for onnxq.runtime.timing and onnxq.compare: statistics against hand-computed values, the interleaved
timing order, model compatibility checks, the JSON report, and real models quantized in the test."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

import onnxq
from onnxq import compare as compare_module
from onnxq.runtime import timing as latency_module
from onnxq.compare import (Backend, CompareConfig, CompareResult, ModelRun, check_compatible, compare,
                           require_backend, write_json)
from onnxq.runtime.session import open_session
from onnxq.errors import CalibrationError, ConfigError, MissingDependencyError, ModelError, OnnxqError
from onnxq.runtime.timing import LatencyStats, format_latency, percentile, speedup, time_interleaved, wall_clock_timer
from onnxq.metrics import OutputMetrics, compare_models
from tests.support.paths import MODELS

EFFICIENTNET = MODELS / "efficientnet_lite0.onnx"
PPOCR = MODELS / "ppocr_mobile_v2_cls.onnx"
TEXTLINES = MODELS / "data" / "textlines"
FAST = CompareConfig(batch_size=2, warmup=1, iterations=2)


def strict_json(text: str) -> dict:
    """Parse `text` refusing NaN/Infinity literals, which are not JSON."""
    def refuse(literal: str) -> None:
        raise ValueError(f"non-standard JSON literal {literal}")
    return json.loads(text, parse_constant=refuse)


# --- latency statistics -----------------------------------------------------------------------


def test_percentiles_of_a_known_list() -> None:
    values = [7.0, 1.0, 10.0, 4.0, 2.0, 9.0, 3.0, 8.0, 6.0, 5.0]  # 1..10 shuffled
    # rank (n-1)*q/100: p50 -> 4.5 -> between 5 and 6 = 5.5; p90 -> 8.1 -> 9 + 0.1 = 9.1; p0/p100 the ends.
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # odd count: the middle value itself
    assert percentile([42.0], 90) == 42.0
    assert percentile(values, 90) == pytest.approx(float(np.percentile(values, 90)))


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 100.5)])
def test_percentile_refuses_no_values_or_a_bad_q(values: list[float], q: float) -> None:
    with pytest.raises(ConfigError):
        percentile(values, q)


def test_latency_stats_of_four_runs() -> None:
    # sorted 1, 2, 3, 4: median rank 1.5 -> 2.5; p90 rank 2.7 -> 3 + 0.7 = 3.7; mean 10/4.
    stats = LatencyStats.of([4.0, 1.0, 3.0, 2.0])
    assert stats.runs_ms == (4.0, 1.0, 3.0, 2.0)  # kept in the order they ran
    assert (stats.median_ms, stats.min_ms, stats.max_ms, stats.mean_ms) == (2.5, 1.0, 4.0, 2.5)
    assert stats.p90_ms == pytest.approx(3.7)
    with pytest.raises(ConfigError):
        LatencyStats.of([])


def test_speedup_is_the_ratio_of_medians() -> None:
    slow, fast = LatencyStats.of([10.0, 12.0, 11.0]), LatencyStats.of([4.0, 4.5, 5.0, 1000.0])
    assert speedup(slow, fast) == pytest.approx(11.0 / 4.75)  # the 1000 ms outlier barely moves the median
    assert speedup(fast, slow) == pytest.approx(4.75 / 11.0)
    zero = LatencyStats.of([0.0])
    assert speedup(slow, zero) == math.inf and math.isnan(speedup(zero, zero))


def test_timed_runs_take_turns_after_a_warm_up_in_turns() -> None:
    calls: list[str] = []
    durations = {"float": iter([9.0, 9.0, 3.0, 5.0, 4.0]), "quant": iter([9.0, 9.0, 1.0, 2.0, 6.0])}

    def timer(label: str):
        def run() -> float:
            calls.append(label)
            return next(durations[label])
        return run

    reference, candidate = time_interleaved([timer("float"), timer("quant")], warmup=2, iterations=3)
    assert calls == ["float", "quant"] * 5
    assert reference.runs_ms == (3.0, 5.0, 4.0) and candidate.runs_ms == (1.0, 2.0, 6.0)  # warm-up discarded
    assert (reference.median_ms, candidate.median_ms) == (4.0, 2.0)
    assert gc.isenabled()


def test_timing_refuses_bad_counts_and_bad_durations() -> None:
    with pytest.raises(ConfigError):
        time_interleaved([lambda: 1.0], warmup=0, iterations=0)
    with pytest.raises(ConfigError):
        time_interleaved([lambda: 1.0], warmup=-1, iterations=1)
    with pytest.raises(ConfigError, match="invalid duration: -1.0"):
        time_interleaved([lambda: -1.0], warmup=0, iterations=1)
    with pytest.raises(ConfigError):
        time_interleaved([], warmup=0, iterations=1)


def test_wall_clock_timer_uses_perf_counter_ns(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([1_000_000, 3_500_000])
    monkeypatch.setattr(latency_module.time, "perf_counter_ns", lambda: next(ticks))
    ran: list[bool] = []
    assert wall_clock_timer(lambda: ran.append(True))() == 2.5
    assert ran == [True]


def test_format_latency_aligns_columns() -> None:
    table = format_latency([("float", LatencyStats.of([10.0, 20.0])), ("quant", LatencyStats.of([5.0]))])
    lines = table.splitlines()
    assert lines[0].split() == ["model", "median", "ms", "p90", "ms", "min", "ms", "max", "ms"]
    assert lines[1].split() == ["float", "15.00", "19.00", "10.00", "20.00"]
    assert lines[2].split() == ["quant", "5.00", "5.00", "5.00", "5.00"]
    assert len({len(line) for line in lines}) == 1  # right-aligned to the same width


# --- tiny models: compatibility checks, the top-1 rule, hand-computed metrics, JSON -----------------


def tiny_model(scale: list[float], input_name: str = "x", width: int = 4, extra_output: str | None = None) \
        -> onnx.ModelProto:
    """x[N, width] -> scores = x * scale (N, 4); single (N, 1); cube (N, 2, 2); flat (N,)."""
    nodes = [helper.make_node("Mul", [input_name, "scale"], ["scores"]),
             helper.make_node("ReduceSum", [input_name, "axis1"], ["single"], keepdims=1),
             helper.make_node("Reshape", [input_name, "cube_shape"], ["cube"]),
             helper.make_node("ReduceSum", [input_name, "axis1"], ["flat"], keepdims=0)]
    outputs = ["scores", "single", "cube", "flat"]
    if extra_output:
        nodes.append(helper.make_node("Identity", ["scores"], [extra_output]))
        outputs.append(extra_output)
    initializers = [onnx.numpy_helper.from_array(np.array(scale, np.float32), "scale"),
                    onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1"),
                    onnx.numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "cube_shape")]
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", width])]
    graph = helper.make_graph(nodes, "tiny", inputs,
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


# Row argmaxes of x*[1,1,1,1]: 0 and 1; of x*[1,1,1,3]: 0 ([1,0,0,.6]) and 3 ([0,2,0,3]) -> top-1 1/2.
ROWS = np.array([[1.0, 0.0, 0.0, 0.2], [0.0, 2.0, 0.0, 1.0]], np.float32)


@pytest.fixture()
def tiny_pair(tmp_path: Path) -> tuple[Path, Path]:
    return save(tiny_model([1, 1, 1, 1]), tmp_path / "float.onnx"), save(tiny_model([1, 1, 1, 3]), tmp_path / "q.onnx")


def test_metrics_and_top1_rule_on_tiny_models(tiny_pair: tuple[Path, Path]) -> None:
    result = compare(*tiny_pair, onnxq.FeedsSource([{"x": ROWS}]), FAST)
    metrics = {m.name: m for m in result.metrics}
    assert [m.name for m in result.metrics] == ["scores", "single", "cube", "flat"]  # the float model's order
    scores = metrics["scores"]
    # ref [1,0,0,.2,0,2,0,1], cand [1,0,0,.6,0,2,0,3]: dot 8.12, |ref|^2 6.04, |cand|^2 14.36, noise .16+4.
    assert scores.cosine == pytest.approx(8.12 / math.sqrt(6.04 * 14.36), rel=1e-6)
    assert scores.sqnr_db == pytest.approx(10 * math.log10(6.04 / 4.16), rel=1e-5)
    assert scores.max_abs_error == pytest.approx(2.0)
    assert scores.top1_agreement == 0.5  # rank 2, 4 classes: class scores
    assert metrics["single"].top1_agreement is None  # rank 2 but one class
    assert metrics["cube"].top1_agreement is None  # rank 3
    assert metrics["flat"].top1_agreement is None  # rank 1
    assert metrics["flat"].cosine == 1.0 and metrics["flat"].sqnr_db == math.inf
    assert (result.samples, result.batches, result.skipped_samples, result.timed_batch) == (2, 1, 0, 2)


def test_json_report_holds_everything_and_is_standard_json(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    result = compare(*tiny_pair, onnxq.FeedsSource([{"x": ROWS}]), FAST)
    path = write_json(result, tmp_path / "report.json")
    report = strict_json(path.read_text())
    assert report["backend"] == "ort" and report["graph_optimizations"] == "all"
    assert report["latency_order"] == "interleaved"
    by_name = {m["name"]: m for m in report["metrics"]}
    assert by_name["flat"]["sqnr_db"] == "inf" and by_name["flat"]["top1_agreement"] is None
    assert by_name["scores"]["top1_agreement"] == 0.5
    for role in ("reference", "candidate"):
        assert report[role]["providers"] == ["CPUExecutionProvider"] and report[role]["unloaded"] == []
        assert len(report[role]["latency"]["runs_ms"]) == FAST.iterations
    ratio = report["reference"]["latency"]["median_ms"] / report["candidate"]["latency"]["median_ms"]
    assert report["speedup"] == pytest.approx(ratio)
    assert report["reference"]["path"] == str(tiny_pair[0]) and report["candidate"]["path"] == str(tiny_pair[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx", "q.onnx", "report.json"]  # no temp file


def test_write_json_into_a_missing_folder_fails_cleanly(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    result = compare(*tiny_pair, onnxq.FeedsSource([{"x": ROWS}]), FAST)
    with pytest.raises(OnnxqError, match="nope/report.json: cannot write the report"):
        write_json(result, tmp_path / "nope" / "report.json")


def test_non_finite_values_become_strings() -> None:
    stats = LatencyStats.of([1.0])
    run = ModelRun("m.onnx", "ONNX Runtime", ("CPUExecutionProvider",), ("CPUExecutionProvider",), stats)
    metrics = (OutputMetrics("y", 1, math.nan, -math.inf, math.nan, None),)
    report = CompareResult(Backend.ORT, "data", 1, 1, 1, 0, metrics, run, run, 1, 0, 1, None, 0.1).to_dict()
    assert report["metrics"][0] == {"name": "y", "samples": 1, "cosine": "nan", "sqnr_db": "-inf",
                                    "max_abs_error": "nan", "top1_agreement": None}
    strict_json(json.dumps(report, allow_nan=False))


@pytest.mark.parametrize(("candidate", "message"), [
    (tiny_model([1, 1, 1, 1], input_name="image"), "input 'x' of the float model is not an input of the quantized"),
    (tiny_model([1, 1, 1, 1], width=8), r"input 'x': the float model takes \(\?, 4\) float32 but the quantized "
                                         r"model takes \(\?, 8\) float32"),
    (tiny_model([1, 1, 1, 1], extra_output="probs"), "only in the float model none; only in the quantized model "
                                                     "'probs'"),
], ids=["input-name", "input-shape", "output-names"])
def test_mismatched_models_are_refused_naming_the_culprit(candidate: onnx.ModelProto, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        check_compatible(tiny_model([1, 1, 1, 1]), candidate)


def test_a_short_last_batch_of_a_fixed_batch_model_is_left_out(tmp_path: Path) -> None:
    model = tiny_model([1, 1, 1, 1])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # fixed batch 2
    reference, candidate = save(model, tmp_path / "a.onnx"), save(model, tmp_path / "b.onnx")
    three = np.concatenate([ROWS, ROWS[:1]])
    result = compare(reference, candidate, onnxq.FeedsSource([{"x": three}]), CompareConfig(batch_size=3, iterations=1))
    assert (result.batch_size, result.samples, result.skipped_samples) == (2, 2, 1)
    with pytest.raises(CalibrationError, match="batches of exactly 2 samples"):
        compare(reference, candidate, onnxq.FeedsSource([{"x": ROWS[:1]}]), FAST)


def test_config_and_backend_checks() -> None:
    with pytest.raises(ConfigError, match="--iterations"):
        CompareConfig(iterations=0)
    with pytest.raises(ConfigError, match="--providers applies to --backend ort only"):
        CompareConfig(backend=Backend.TRT, providers=("cuda",))
    assert CompareConfig(providers=("cpu",)).providers == ("CPUExecutionProvider",)
    require_backend(Backend.ORT)  # nothing to check
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(MissingDependencyError, match="^--backend trt: TensorRT is not installed"):
            require_backend(Backend.TRT)


# --- real models, quantized here ----------------------------------------------------------------


@pytest.fixture(scope="module")
def efficientnet_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 3, 224, 224), dtype=np.float32)} for _ in range(4)]
    quantized = onnxq.quantize(onnxq.load_model(EFFICIENTNET), onnxq.FeedsSource(feeds)).model
    path = onnxq.save_model(quantized, tmp_path_factory.mktemp("efficientnet") / "efficientnet.int8.onnx")
    return EFFICIENTNET, path, feeds


def test_efficientnet_against_its_int8_copy(efficientnet_pair: tuple[Path, Path, list]) -> None:
    reference, candidate, feeds = efficientnet_pair
    result = compare(reference, candidate, onnxq.FeedsSource(feeds), FAST)
    (logits,) = result.metrics
    assert logits.name == "logits" and logits.samples == 4 and result.batches == 2
    assert 0.9 < logits.cosine < 1.0 and math.isfinite(logits.sqnr_db) and logits.max_abs_error > 0
    assert logits.top1_agreement is not None
    # Optimized sessions fuse Q/DQ into integer kernels: close to, not bit-equal with, the exact Q/DQ check.
    (exact,) = compare_models(onnx.load(str(reference)), onnx.load(str(candidate)), feeds)
    assert logits.cosine == pytest.approx(exact.cosine, abs=0.01)
    assert result.reference.providers == result.candidate.providers == ("CPUExecutionProvider",)
    assert len(result.reference.latency.runs_ms) == len(result.candidate.latency.runs_ms) == FAST.iterations
    assert result.speedup == pytest.approx(result.reference.latency.median_ms / result.candidate.latency.median_ms)
    assert result.timed_batch == 2


def test_efficientnet_against_itself_is_identical(efficientnet_pair: tuple[Path, Path, list]) -> None:
    reference, _, feeds = efficientnet_pair
    (logits,) = compare(reference, reference, onnxq.FeedsSource(feeds[:2]), FAST).metrics
    assert (logits.cosine, logits.sqnr_db, logits.max_abs_error, logits.top1_agreement) == (1.0, math.inf, 0.0, 1.0)


def test_ppocr_classifier_on_its_eval_lines(tmp_path: Path) -> None:
    with np.load(TEXTLINES / "ppocr_cls_calib.npz") as calib:
        feeds = [{"x": calib["x"][:8]}]
    quantized = onnxq.quantize(onnxq.load_model(PPOCR), onnxq.FeedsSource(feeds)).model
    candidate = onnxq.save_model(quantized, tmp_path / "ppocr.int8.onnx")
    result = compare(PPOCR, candidate, TEXTLINES / "ppocr_cls_eval.npz",
                     CompareConfig(batch_size=64, warmup=1, iterations=2))
    (scores,) = result.metrics
    assert result.samples == scores.samples == 200 and result.batches == 4  # 64+64+64+8
    assert result.timed_batch == 64
    assert scores.top1_agreement is not None and scores.top1_agreement >= 0.95
    assert scores.cosine > 0.98


def test_both_sessions_are_optimized_with_the_same_threads(tiny_pair: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[dict] = []
    real_open = compare_module.open_session

    def spy(model, providers, **options):
        opened.append(options)
        return real_open(model, providers, **options)

    monkeypatch.setattr(compare_module, "open_session", spy)
    result = compare(*tiny_pair, onnxq.FeedsSource([{"x": ROWS}]), CompareConfig(iterations=1, intra_op_threads=1))
    assert opened == [{"optimize": True, "intra_op_threads": 1, "spin": False}] * 2
    assert result.intra_op_threads == 1


def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Stand-ins for onnxq.runtime.trt's runtime/build/engine modules: ONNX Runtime underneath, fixed shapes like a
    TensorRT profile, and `time` returning 1 ms per run for the float engine and 0.5 ms for the other."""
    calls: dict[str, list] = {"built": [], "timed": []}

    def build_engine(path, config):
        calls["built"].append((Path(path).name, dict(config.shapes)))
        return types.SimpleNamespace(plan=str(path).encode(), layer_precisions={"FP32": 3, "INT8": 1})

    class TrtEngine:
        def __init__(self, plan: bytes) -> None:
            self.name = Path(plan.decode()).name
            self.session = open_session(plan.decode())
            self.shapes = dict(calls["built"][-1][1])

        def run(self, feed):
            assert {n: a.shape for n, a in feed.items()} == self.shapes, "outside the engine's profile"
            return self.session.run(feed)

        def time(self, feed, warmup, iterations):
            calls["timed"].append((self.name, warmup, iterations))
            return np.full(iterations, 1.0 if self.name == "float.onnx" else 0.5)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.session.close()

    modules = {"runtime": types.SimpleNamespace(require_tensorrt=lambda: None, require_gpu=lambda: None,
                                                tensorrt_version=lambda: (10, 8)),
               "build": types.SimpleNamespace(build_engine=build_engine,
                                              BuildConfig=lambda shapes: types.SimpleNamespace(shapes=shapes)),
               "engine": types.SimpleNamespace(TrtEngine=TrtEngine)}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, f"onnxq.runtime.trt.{name}", module)
    return calls


def test_trt_backend_against_the_engine_api(tiny_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_tensorrt(monkeypatch)
    three = np.concatenate([ROWS, ROWS[:1]])
    config = CompareConfig(backend=Backend.TRT, batch_size=2, warmup=2, iterations=3)
    result = compare(*tiny_pair, onnxq.FeedsSource([{"x": three}]), config)
    assert calls["built"] == [("float.onnx", {"x": (2, 4)}), ("q.onnx", {"x": (2, 4)})]  # the first batch's shape
    assert (result.samples, result.skipped_samples) == (2, 1)  # the short last batch does not fit the engines
    assert result.metrics[0].top1_agreement == 0.5
    assert result.speedup == 2.0  # CUDA-event times: 1 ms float, 0.5 ms quant
    assert calls["timed"] == [("float.onnx", 0, 1), ("q.onnx", 0, 1)] * 5  # interleaved, warm-up included
    assert result.reference.providers == ("TensorRT 10.8",) and result.reference.unloaded == ()
    assert dict(result.candidate.layer_precisions) == {"FP32": 3, "INT8": 1}
    assert result.to_dict()["graph_optimizations"] is None
