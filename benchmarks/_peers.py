"""The peers `accuracy_table.py` runs beside onnxq: ONNX Runtime's quantize_static and NNCF's ONNX PTQ.

Each function takes a float `onnx.ModelProto` and the calibration samples as a list of feeds, and returns
the quantized ModelProto; failures propagate (the caller turns them into "refused: ..." cells).
`qdq_summary` says what a quantized model quantized (also inside If/Loop/Scan subgraphs), and whether a
graph output comes straight out of a DequantizeLinear.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

Feed = Mapping[str, np.ndarray]

#: ONNX Runtime's calibrators, by the name the table prints.
ORT_CALIBRATORS = ("MinMax", "Entropy", "Percentile")


def first_line(error: BaseException) -> str:
    """The error's type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send what a peer prints (progress bars, notes) to stderr, so stdout holds only the tables, and
    drop its logged warnings (ORT logs one per bias it cannot quantize, through the root logger)."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logging.disable(logging.NOTSET)


# ------------------------------------------------------------------ ONNX Runtime quantize_static

def ort_options(target: str) -> dict:
    """quantize_static's options for the comparison with an onnxq target.

    trt: activations and weights QInt8 symmetric, weights per channel (what TensorRT runs).
    ort-cpu: ORT's u8s8 for x86 CPUs, QUInt8 activations with a zero point and QInt8 weights, and the
    function's other defaults (per-tensor weights, reduce_range off).
    """
    from onnxruntime import quantization as ortq

    if target == "trt":
        return {"activation_type": ortq.QuantType.QInt8, "weight_type": ortq.QuantType.QInt8,
                "per_channel": True, "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}}
    return {"activation_type": ortq.QuantType.QUInt8, "weight_type": ortq.QuantType.QInt8}


def ort_quantize(model: onnx.ModelProto, calib_batches: Sequence[Feed], target: str,
                 calibrator: str) -> onnx.ModelProto:
    """ONNX Runtime's quantize_static in QDQ format, its data reader fed `calib_batches` in order."""
    from onnxruntime import quantization as ortq

    class Reader(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calib_batches)

        def get_next(self) -> dict | None:
            batch = next(self._batches, None)
            return None if batch is None else dict(batch)

    with tempfile.TemporaryDirectory() as folder, quiet_stdout():
        source, output = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        onnx.save(model, source)
        ortq.quantize_static(str(source), str(output), Reader(), quant_format=ortq.QuantFormat.QDQ,
                             calibrate_method=getattr(ortq.CalibrationMethod, calibrator),
                             **ort_options(target))
        return onnx.load(output)


# ------------------------------------------------------------------ NNCF

def nncf_version() -> str:
    """NNCF's version, or why it cannot be imported."""
    try:
        import nncf
    except Exception as error:  # noqa: BLE001 - any import failure is reported, not raised
        return f"not importable ({first_line(error)})"
    return nncf.__version__


def nncf_quantize(model: onnx.ModelProto, calib_samples: Sequence[Feed], transformer: bool) -> onnx.ModelProto:
    """`nncf.quantize` with its defaults (preset PERFORMANCE, fast bias correction on, subset_size 300,
    here capped by the samples given), one dataset item per sample; ModelType.TRANSFORMER if asked."""
    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)
    options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    with quiet_stdout():
        return nncf.quantize(model, nncf.Dataset([dict(sample) for sample in calib_samples]), **options)


# ------------------------------------------------------------------ what a quantized model quantized

def _graphs(graph: onnx.GraphProto, depth: int = 0) -> Iterator[tuple[onnx.GraphProto, int]]:
    yield graph, depth
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g, depth + 1)
            for sub in attribute.graphs:
                yield from _graphs(sub, depth + 1)


def qdq_summary(model: onnx.ModelProto) -> dict:
    """QuantizeLinear / DequantizeLinear counts in the main graph and in subgraphs, and the graph outputs
    that a DequantizeLinear writes (a peer that quantizes the model's outputs)."""
    counts = {"quantize_main": 0, "dequantize_main": 0, "quantize_subgraphs": 0, "dequantize_subgraphs": 0}
    for graph, depth in _graphs(model.graph):
        where = "main" if depth == 0 else "subgraphs"
        for node in graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                counts[f"{node.op_type[:-6].lower()}_{where}"] += 1
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    counts["dequantized_outputs"] = [o.name for o in model.graph.output
                                     if producers.get(o.name) == "DequantizeLinear"]
    return counts
