"""Plain ONNX Runtime sessions for tests that check a model's outputs outside onnxq's own `open_session`.

`onnxq.runtime.session.open_session` is what the library uses and is tested in tests/runtime/test_session.py;
these helpers hand the model to onnxruntime directly, so a reference run does not depend on the code under
test. The IR-version workaround lives here only: `onnx.helper.make_model` writes the newest IR version onnx
knows, which ONNX Runtime may not load yet, so a model that is newer than this onnxruntime accepts runs as a
copy with the lowest IR version its opsets allow (what `onnxq.io.from_graph` writes). Models ONNX Runtime
accepts as they are, and model files, are passed through untouched.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

__all__ = ["newest_ir_version", "session", "run_model", "optimized_session"]

CPU = ["CPUExecutionProvider"]
# Warnings off (ORT warns about e.g. unused initializers); errors still show.
_LOG_ERRORS_ONLY = 3


@functools.cache
def newest_ir_version() -> int:
    """The newest ONNX IR version this onnxruntime loads (found by trying a one-node model)."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for ir_version in range(onnx.IR_VERSION, 3, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version)
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=CPU)
        except Exception:  # onnxruntime's exceptions share no base class but Exception
            continue
        return ir_version
    raise RuntimeError("this onnxruntime loads no IR version from 4 on")


def _loadable(model: onnx.ModelProto | str | os.PathLike[str]) -> str | bytes:
    """What to hand ONNX Runtime: a path as is, a model serialized with an IR version it accepts."""
    if not isinstance(model, onnx.ModelProto):
        return os.fspath(model)
    if model.ir_version > newest_ir_version():
        lowered = onnx.ModelProto()
        lowered.CopyFrom(model)
        lowered.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
        model = lowered
    return model.SerializeToString()


def session(model: onnx.ModelProto | str | os.PathLike[str], *, optimized: bool = False,
            disabled_optimizers: Sequence[str] = (), optimized_model_path: str | os.PathLike[str] | None = None,
            ) -> ort.InferenceSession:
    """A CPU `onnxruntime.InferenceSession` for `model` (a ModelProto or a model file).

    Args:
        model: the model, or the path of an .onnx file.
        optimized: all of ONNX Runtime's graph optimizations (ORT_ENABLE_ALL, its default level, what a bare
            `InferenceSession` applies); off (ORT_DISABLE_ALL) runs the graph as written.
        disabled_optimizers: ONNX Runtime transformers to leave out, by name.
        optimized_model_path: where ONNX Runtime saves the graph it optimized.
    """
    options = ort.SessionOptions()
    options.log_severity_level = _LOG_ERRORS_ONLY
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimized else level.ORT_DISABLE_ALL
    if optimized_model_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_model_path)
    extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    return ort.InferenceSession(_loadable(model), options, providers=CPU, **extra)


def run_model(model: onnx.ModelProto | str | os.PathLike[str], feed: Mapping[str, np.ndarray], *,
              optimized: bool = False, disabled_optimizers: Sequence[str] = ()) -> list[np.ndarray]:
    """Run `model` once on `feed` in a fresh `session`; every graph output, in graph order."""
    return session(model, optimized=optimized, disabled_optimizers=disabled_optimizers).run(None, dict(feed))


def optimized_session(model: onnx.ModelProto, folder: Path) -> tuple[ort.InferenceSession, Counter[str]]:
    """A fully optimized CPU session, and the op counts of the graph ONNX Runtime fused `model` into.

    ONNX Runtime saves its optimized graph as `folder/optimized.onnx` (read by the tests that check fusion).
    """
    path = folder / "optimized.onnx"
    fused = session(model, optimized=True, optimized_model_path=path)
    return fused, Counter(node.op_type for node in onnx.load(str(path)).graph.node)
