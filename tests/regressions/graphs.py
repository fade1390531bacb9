"""Small valid models built with onnx.helper, and running onnxq's output in ONNX Runtime as users do.

The regressions in this folder were found by random valid graphs (issue 12): each is the smallest model
that reproduced its bug. `quantize_and_run` quantizes for one target and runs the written model in a fully
optimized ONNX Runtime session (ORT_ENABLE_ALL, what a bare InferenceSession does), where ORT's QDQ fusions
happen: a model that only runs unoptimized is not one its target can run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxq
from tests.support.runtime import run_model

__all__ = ["TARGETS", "model", "weight", "feeds", "quantize_and_run", "cosine"]

TARGETS = ("trt", "ort-cpu")


def model(nodes: Sequence[onnx.NodeProto], inputs: dict[str, Sequence[int]], outputs: dict[str, Sequence[int] | None],
          initializers: Sequence[onnx.TensorProto] = (), opset: int = 17) -> onnx.ModelProto:
    """A checked model of `nodes` (float32 inputs and outputs; an output shape None: inferred), with the
    lowest IR version its opset allows (what ONNX Runtime loads)."""
    graph = helper.make_graph(
        list(nodes), "regression",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None if shape is None else list(shape))
         for name, shape in outputs.items()],
        list(initializers))
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    built.ir_version = helper.find_min_ir_version_for(list(built.opset_import))
    built = onnx.shape_inference.infer_shapes(built, strict_mode=True)  # fills the output shapes left None
    onnx.checker.check_model(built, full_check=True)
    return built


def weight(name: str, shape: Sequence[int], seed: int = 0) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def feeds(built: onnx.ModelProto, count: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` random batches for the model's (fixed-shape) inputs."""
    rng = np.random.default_rng(seed)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in built.graph.input}
    return [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
            for _ in range(count)]


def quantize_and_run(built: onnx.ModelProto, target: str, **config: object) -> tuple[onnxq.QuantResult, list[np.ndarray]]:
    """Quantize `built` for `target` on random data; the written model's outputs on one more batch, computed
    by a fully optimized ONNX Runtime session."""
    calibration = feeds(built)
    result = onnxq.quantize(built, onnxq.FeedsSource(calibration),
                            onnxq.QuantConfig(target=target, latency_search=False, **config))
    return result, run_model(result.model, feeds(built, 1, seed=99)[0], optimized=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
