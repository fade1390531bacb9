"""Bias correction's measured effect on the shipped models, and how its sequential form compares with others.

    python benchmarks/bias_correction.py [--models lite0,ppocr] [--targets trt,ort-cpu] [--methods max,mse]
    python benchmarks/bias_correction.py --variants [--models lite0] [--targets trt] [--methods max]

Default: for each model, target (ort-cpu with the latency search off) and range method, `onnxq.quantize`
with `bias_correction=False` and `True` (the step as it runs by default: shifts measured on 3/4 of the
calibration data, kept only if the held-back quarter's SQNR rises), then both models against the float
model on the evaluation data: top-1 agreement, cosine and SQNR of the output, and for PP-OCR, whose output
is a two-class softmax, also of the logits (the Softmax's input). EfficientNet-Lite0: the 64 calibration
photos, `--mean 127 --std 128`, the 192 evaluation photos; PP-OCR: the 64 calibration and 200 evaluation
text lines.

--variants: the corrections measured on all calibration samples (batch 8) in four ways, applied, and
measured on the evaluation data:
  none        no correction
  sequential  the step's: each layer's shift in the Q/DQ model after the layers before it were corrected,
              all in one pass (`onnxq.steps.bias_measure`)
  fast        each layer's shift with float inputs: its quantized copy beside it in the float model (NNCF's
              "fast bias correction")
  one-shot    every layer's shift from one pass of the uncorrected Q/DQ model, all corrected at once
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxq  # noqa: E402
from onnxq.calib.expose import expose_tensors  # noqa: E402
from onnxq.calib.ranges import activation_params  # noqa: E402
from onnxq.io import from_graph, to_graph  # noqa: E402
from onnxq.lower.insert_qdq import insert_qdq  # noqa: E402
from onnxq.runtime.session import open_session  # noqa: E402
from onnxq.steps.bias_correction import measure_shifts  # noqa: E402
from onnxq.steps.bias_shift import LinearLayer, linear_layers, shift_biases  # noqa: E402

MODELS = ROOT / "models"
DATA = MODELS / "data"


@dataclass(frozen=True)
class Case:
    model: Path
    calib: Path
    evaluation: Path
    preprocess: onnxq.ImagePreprocess


CASES = {
    "lite0": Case(MODELS / "efficientnet_lite0.onnx", DATA / "photos" / "calib", DATA / "photos" / "eval",
                  onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)),
    "ppocr": Case(MODELS / "ppocr_mobile_v2_cls.onnx", DATA / "textlines" / "ppocr_cls_calib.npz",
                  DATA / "textlines" / "ppocr_cls_eval.npz", onnxq.ImagePreprocess()),
}


class Scorer:
    """The float model's outputs (and logits, before a final Softmax) on the evaluation data, once."""

    def __init__(self, case: Case, model: onnx.ModelProto) -> None:
        source = onnxq.open_source(case.evaluation, onnxq.signature_of(model), case.preprocess)
        self.feeds = list(source.batches(64))
        softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
        self.names = [model.graph.output[0].name] + ([softmax[0].input[0]] if softmax else [])
        self.reference = self._run(model)

    def _run(self, model: onnx.ModelProto) -> list[np.ndarray]:
        exposed = from_graph(expose_tensors(to_graph(model), self.names), template=model)
        with open_session(exposed) as session:
            runs = [session.run(feed, self.names) for feed in self.feeds]
        return [np.concatenate([run[name] for run in runs]).astype(np.float64) for name in self.names]

    def score(self, model: onnx.ModelProto) -> str:
        figures = []
        for ref, out, label in zip(self.reference, self._run(model), ("output", "logits")):
            cosine = float((ref * out).sum() / np.sqrt((ref ** 2).sum() * (out ** 2).sum()))
            sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum())
            top1 = f"top-1 {100 * np.mean(ref.argmax(1) == out.argmax(1)):6.2f}% " if label == "output" else ""
            figures.append(f"{label}: {top1}cosine {cosine:.6f} SQNR {sqnr:6.2f} dB")
        return " | ".join(figures)


def effect(case: Case, name: str, target: str, method: str) -> None:
    model = onnxq.load_model(case.model)
    scorer = Scorer(case, model)
    for on in (False, True):
        config = onnxq.QuantConfig(target=target, latency_search=False, bias_correction=on,
                                   calib=onnxq.CalibConfig(method=onnxq.CalibMethod(method)))
        started = time.perf_counter()
        result = onnxq.quantize(model, case.calib, config, preprocess=case.preprocess)
        seconds = time.perf_counter() - started
        found = result.finding(onnxq.BiasCorrected)
        step = ("" if not isinstance(found, onnxq.BiasCorrected) else
                f"  [step {found.seconds:.1f} s, {found.verdict} on {found.before[0].samples} held back]")
        print(f"{name:6} {target:8} {method:4} bias correction {'on ' if on else 'off'}: {scorer.score(result.model)}"
              f"  (quantize {seconds:.1f} s){step}", flush=True)


# --- variants ---------------------------------------------------------------------------------------

def _fast_shifts(float_model: onnx.ModelProto, quantized: onnx.ModelProto, layers: list[LinearLayer],
                 source: onnxq.CalibSource) -> dict[str, np.ndarray]:
    """Each layer's shift with float inputs: its node from the Q/DQ model, with the Q/DQ nodes it reads,
    beside the float model (they read the float model's tensors by name), both outputs exposed."""
    merged = onnx.ModelProto()
    merged.CopyFrom(float_model)
    producers = {out: node for node in quantized.graph.node for out in node.output}
    present = {t.name for t in merged.graph.initializer}
    wanted, added, copies = {layer.node_name for layer in layers}, {}, {}
    for node in quantized.graph.node:
        if node.name not in wanted:
            continue
        pending = list(node.input)
        while pending:
            producer = producers.get(pending.pop())
            if producer is not None and producer.op_type in ("QuantizeLinear", "DequantizeLinear"):
                if producer.name not in added:
                    added[producer.name] = producer
                    pending += list(producer.input)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name, copy.output[0] = f"{node.name}__fast", f"{node.output[0]}__fast"
        copies[node.output[0]] = copy.output[0]
        added[copy.name] = copy
    merged.graph.node.extend(added.values())
    merged.graph.initializer.extend(t for t in quantized.graph.initializer if t.name not in present)
    names = [*copies, *copies.values()]
    merged.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    exposed = from_graph(to_graph(merged).toposort(), template=float_model)
    sums: dict[str, np.ndarray] = {}
    with open_session(exposed) as session:
        for feed in source.batches(8):
            values = session.run(feed, names)
            for layer in layers:
                diff = values[layer.output_name].astype(np.float64) - values[copies[layer.output_name]]
                axis = layer.channel_axis % diff.ndim
                mean = diff.mean(axis=tuple(i for i in range(diff.ndim) if i != axis)) * diff.shape[0]
                sums[layer.node_name] = sums.get(layer.node_name, 0) + mean
    total = sum(next(iter(feed.values())).shape[0] for feed in source.batches(8))
    return {key: value / total for key, value in sums.items()}


def _layer_means(model: onnx.ModelProto, layers: list[LinearLayer], source: onnxq.CalibSource) -> dict[str, np.ndarray]:
    names = [layer.output_name for layer in layers]
    exposed = from_graph(expose_tensors(to_graph(model), names), template=model)
    sums: dict[str, np.ndarray] = {}
    count = 0
    with open_session(exposed) as session:
        for feed in source.batches(8):
            values = session.run(feed, names)
            count += next(iter(feed.values())).shape[0]
            for layer in layers:
                array = values[layer.output_name].astype(np.float64)
                axis = layer.channel_axis % array.ndim
                sums[layer.node_name] = sums.get(layer.node_name, 0) + array.mean(
                    axis=tuple(i for i in range(array.ndim) if i != axis)) * array.shape[0]
    return {key: value / count for key, value in sums.items()}


@dataclass(frozen=True)
class Variants(onnxq.Step):
    """After calibration: measure the corrections every way, score each corrected model, keep the plan."""

    scorer: Scorer
    label: str
    printed: list[str] = field(default_factory=list, compare=False)
    name = "variants"

    def refine(self, job, plan):  # type: ignore[no-untyped-def]
        graph, source = job.graph, job.source
        layers, _ = linear_layers(graph, plan)
        params = activation_params(plan, job.calibration.stats, job.config.calib, job.target.scheme)
        quantized = from_graph(insert_qdq(graph, plan, params), template=job.model)
        float_model = from_graph(graph, template=job.model)
        timed = {}
        started = time.perf_counter()
        timed["sequential"] = (measure_shifts(job, plan, layers, source).means, time.perf_counter() - started)
        started = time.perf_counter()
        timed["fast"] = (_fast_shifts(float_model, quantized, layers, source), time.perf_counter() - started)
        started = time.perf_counter()
        floats, ints = _layer_means(float_model, layers, source), _layer_means(quantized, layers, source)
        timed["one-shot"] = ({k: floats[k] - ints[k] for k in floats}, time.perf_counter() - started)
        for variant, (deltas, seconds) in [("none", ({}, 0.0)), *timed.items()]:
            job.replace_graph(shift_biases(graph, layers, deltas))
            score = self.scorer.score(job.build(job.replan()))
            print(f"{self.label} {variant:10}: {score}  (measured in {seconds:.1f} s)", flush=True)
        job.replace_graph(graph)
        return plan, None


def variants(case: Case, name: str, target: str, method: str) -> None:
    model = onnxq.load_model(case.model)
    config = onnxq.QuantConfig(target=target, latency_search=False, bias_correction=False,
                               calib=onnxq.CalibConfig(method=onnxq.CalibMethod(method)))
    onnxq.quantize(model, case.calib, config, preprocess=case.preprocess,
                   steps=[Variants(Scorer(case, model), f"{name:6} {target:8} {method:4}")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lite0,ppocr")
    parser.add_argument("--targets", default="trt,ort-cpu")
    parser.add_argument("--methods", default="max,mse")
    parser.add_argument("--variants", action="store_true", help="compare the ways of measuring the shift")
    args = parser.parse_args()
    run = variants if args.variants else effect
    for name in args.models.split(","):
        for target in args.targets.split(","):
            for method in args.methods.split(","):
                run(CASES[name], name, target, method)


if __name__ == "__main__":
    main()
