"""--latency-search: layer classes, the keep/float decisions, and a real run on the PP-OCR classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.steps import latency_search
from onnxq.pipeline import prepare
from onnxq.runtime.session import open_session
from onnxq.errors import ConfigError
from onnxq.steps.latency_search import LatencySearchConfig, layer_classes
from onnxq.targets import plan_quantization
from tests.support.paths import MODELS

PPOCR = MODELS / "ppocr_mobile_v2_cls.onnx"
TEXTLINES = MODELS / "data" / "textlines"


@pytest.fixture(scope="module")
def ppocr() -> onnx.ModelProto:
    return onnxq.load_model(PPOCR)


@pytest.fixture(scope="module")
def calib() -> onnxq.FeedsSource:
    x = np.load(TEXTLINES / "ppocr_cls_calib.npz")["x"][:16]
    return onnxq.FeedsSource([{"x": x[:8]}, {"x": x[8:]}])


def _ort_cpu() -> onnxq.QuantConfig:
    return onnxq.QuantConfig(target=onnxq.Target.ORT_CPU)


def test_layer_classes_of_the_ppocr_classifier(ppocr: onnx.ModelProto) -> None:
    graph = prepare(ppocr)
    plan = plan_quantization(graph, target=onnxq.Target.ORT_CPU)
    classes = layer_classes(graph, plan)
    assert len(classes["Conv depthwise 5x5"]) == 8 and len(classes["Conv depthwise 3x3"]) == 3
    assert list(classes)[0] == "Conv 1x1"  # largest class first
    members = [node for nodes in classes.values() for node in nodes]
    assert sorted(members) == sorted(d.node_name for d in plan.quantized_nodes)


def _int8_depthwise_5x5(model: onnx.ModelProto) -> int:
    """How many 5x5 depthwise Convs read an INT8 weight (through a DequantizeLinear)."""
    produced_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    kernels = {n.name: [a.ints for a in n.attribute if a.name == "kernel_shape"] for n in model.graph.node}
    return sum(1 for n in model.graph.node if n.op_type == "Conv" and n.input[1] in produced_by_dq
               and any(list(k) == [5, 5] for k in kernels[n.name])
               and any(a.name == "group" and a.i > 1 for a in n.attribute))


def test_decisions_follow_the_measured_times(monkeypatch, ppocr: onnx.ModelProto, calib: onnxq.FeedsSource) -> None:
    """A stand-in clock on which only INT8 5x5 depthwise Convs cost time: exactly that class goes float."""

    def medians(self, models: list[onnx.ModelProto], runs: int | None = None) -> list[float]:
        return [5.0 + 1.0 * _int8_depthwise_5x5(model) for model in models]

    monkeypatch.setattr(latency_search._Timer, "medians", medians)
    result = onnxq.quantize(ppocr, calib, _ort_cpu(), latency=LatencySearchConfig(runs=3))
    search = result.latency
    assert search is not None and search.start_ms == 13.0 and search.final_ms == 5.0
    by_class = {trial.layer_class: trial for trial in search.trials}
    assert not by_class["Conv depthwise 5x5"].kept_int8
    assert "float is 61.5% faster" in by_class["Conv depthwise 5x5"].reason
    assert all(trial.kept_int8 for name, trial in by_class.items() if name != "Conv depthwise 5x5")
    assert "INT8 kept: float would be 0.0% slower" in by_class["Conv 1x1"].reason
    assert sorted(search.float_nodes) == sorted(by_class["Conv depthwise 5x5"].nodes)
    assert _int8_depthwise_5x5(result.model) == 0
    for node in search.float_nodes:
        assert not result.plan.decision(node).quantized
    onnx.checker.check_model(result.model, full_check=True)


def test_a_class_clearly_slower_in_float_is_decided_by_the_probe(monkeypatch, ppocr: onnx.ModelProto,
                                                                   calib: onnxq.FeedsSource) -> None:
    """Float 5x5 depthwise Convs twice as slow: decided after the short probe round, no full rounds."""
    rounds: list[int | None] = []

    def medians(self, models: list[onnx.ModelProto], runs: int | None = None) -> list[float]:
        rounds.append(runs)
        return [10.0 + 10.0 * (_int8_depthwise_5x5(model) == 0) for model in models]

    monkeypatch.setattr(latency_search._Timer, "medians", medians)
    result = onnxq.quantize(ppocr, calib, _ort_cpu(), latency=LatencySearchConfig(runs=20))
    by_class = {trial.layer_class: trial for trial in result.latency.trials}
    assert by_class["Conv depthwise 5x5"].kept_int8 and "5-run probe" in by_class["Conv depthwise 5x5"].reason
    assert rounds[0] is None and rounds.count(5) == len(result.latency.trials)  # one probe per class
    assert rounds.count(None) == 1 + (len(result.latency.trials) - 1)  # the start, then full rounds for the rest
    assert result.latency.seconds > 0


def test_real_search_on_the_ppocr_classifier(ppocr: onnx.ModelProto, calib: onnxq.FeedsSource) -> None:
    """Real timings (too few runs to trust the figures): the chosen model is valid and still agrees with float."""
    config = LatencySearchConfig(runs=3, warmup=1)
    progress: list[tuple[int, int | None]] = []
    result = onnxq.quantize(ppocr, calib, _ort_cpu(), latency=config,
                            on_progress=lambda stage, done, total: progress.append((done, total))
                            if stage == "timing layer classes" else None)
    search = result.latency
    assert search is not None
    classes = layer_classes(prepare(ppocr), plan_quantization(prepare(ppocr), target=onnxq.Target.ORT_CPU))
    first, second = search.trials[:len(classes)], search.trials[len(classes):]
    assert [trial.layer_class for trial in first] == list(classes)
    kept_after_first = {trial.layer_class for trial in first if trial.kept_int8}
    assert all(t.layer_class in kept_after_first and t.reason.endswith("[sweep 2]") for t in second)
    assert len(second) in (0, len(kept_after_first)) and (not second or len(kept_after_first) < len(classes))
    assert [done for done, _ in progress] == list(range(1, len(search.trials) + 1))
    assert progress[-1][1] == len(search.trials)
    assert min(search.float_model_ms, search.start_ms, search.final_ms) > 0
    last = {trial.layer_class: trial for trial in search.trials}
    for trial in last.values():
        assert trial.kept_int8 == (trial.nodes[0] not in search.float_nodes)
        if not trial.kept_int8:  # (a kept class can still lose nodes: an Add whose producers went float)
            assert not any(result.plan.decision(node).quantized for node in trial.nodes)
    onnx.checker.check_model(result.model, full_check=True)
    x = np.load(TEXTLINES / "ppocr_cls_eval.npz")["x"][:32]
    with open_session(ppocr) as reference, open_session(result.model) as candidate:
        (want,), (got,) = reference.run({"x": x}).values(), candidate.run({"x": x}).values()
    assert np.mean(want.argmax(1) == got.argmax(1)) >= 0.9


def test_latency_search_is_refused_where_it_cannot_run(ppocr: onnx.ModelProto, calib: onnxq.FeedsSource,
                                                       tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--latency-search cannot run: it is not for --target trt"):
        onnxq.quantize(ppocr, calib, onnxq.QuantConfig(), latency=LatencySearchConfig())
    stats, _ = onnxq.collect_stats(ppocr, calib)
    with pytest.raises(ConfigError, match="a statistics file holds no batch to time"):
        onnxq.quantize(ppocr, config=_ort_cpu(), stats=stats, latency=LatencySearchConfig())
    with pytest.raises(ConfigError, match="at least 3 runs|>= 3 runs"):
        LatencySearchConfig(runs=1)
    with pytest.raises(ConfigError, match="min_gain"):
        LatencySearchConfig(min_gain=1.5)


def test_models_with_a_fixed_batch_are_timed_on_a_batch_they_accept() -> None:
    """The onnx package's SqueezeNet takes batches of exactly 1; calibration data comes as 8 such feeds."""
    import models

    path = next(p for p in models.light_model_paths() if "squeezenet" in p.stem)
    model = onnxq.load_model(path)
    feeds = [models.random_feeds(model, batch=1, seed=seed) for seed in range(8)]
    result = onnxq.quantize(model, onnxq.FeedsSource(feeds), _ort_cpu(), latency=LatencySearchConfig(runs=3))
    assert result.latency is not None and result.latency.trials
    onnx.checker.check_model(result.model, full_check=True)
