"""What quantizing a valid float model may end in, and `check_quantize`, which says which it did.

"ok": `onnxq.quantize` returned a model that passes onnx's full checker, loads and runs in ONNX Runtime with
graph optimizations on and off, gives finite outputs of the float model's shapes, and keeps every output
within a loose cosine of the float model's (COSINE_BOUND) on fresh random data at other values of the
dynamic dims than it was calibrated at.

"refused": a documented refusal, one line, of an `onnxq.OnnxqError` class. For a model that ONNX Runtime
runs as given there are few: `ACCEPTABLE_REFUSALS` lists them and why each is the user's to act on.

"failure": anything else, with what reproduces it: an InternalError or any other exception, an
OnnxqError that is not a documented refusal (or spans lines), a written model the checker rejects, an ORT
error, a NaN/Inf output, a shape change, a cosine below the bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

import onnxq
from onnxq.errors import OnnxqError
from tests.fuzz.generator import ModelDescription, random_feeds
from tests.support.runtime import newest_ir_version

__all__ = ["Outcome", "check_quantize", "ACCEPTABLE_REFUSALS", "COSINE_BOUND", "CALIB_SAMPLES"]

COSINE_BOUND = 0.5
#: Outputs with fewer elements also pass on |int8 - float| <= 0.1 max|float| + FEW_ELEMENTS_ATOL
#: (seed 809: a [1,1,1,1] Conv output, float -0.0073 against INT8 +0.00008, one quantization step apart).
FEW_ELEMENTS = 8
FEW_ELEMENTS_ATOL = 0.02
CALIB_SAMPLES = 8

# (error class name, a regular expression the message must match from its start, why a user can act on it)
ACCEPTABLE_REFUSALS = (
    ("ModelError", r"cannot convert the model from opset",
     "onnx's version converter cannot raise this opset-11/12 model to opset 13 (per-channel Q/DQ needs it); "
     "the message names the op and says to re-export at opset 13 or newer"),
    ("CalibrationError", r"tensor '[^']+': every calibration value is NaN, Inf or a sentinel",
     "the float model itself writes nothing but -FLT_MAX, Inf or NaN there (seed 1441: a dilated MaxPool whose "
     "window is larger than its input fills its output with float32's lowest value); there is no range to "
     "quantize, and the message names the tensor and says to exclude the node that reads it"),
)


@dataclass(frozen=True)
class Outcome:
    """The result of one check: kind "ok", "refused" or "failure"; `message` is the error's first line
    (for "refused" and "failure"), prefixed by the stage that failed."""

    kind: str
    label: str
    target: str
    method: str
    message: str = ""

    def __str__(self) -> str:
        where = f"{self.label} target={self.target} method={self.method}"
        return f"{self.kind}: {where}" + (f": {self.message}" if self.message else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _ort_error(err: BaseException) -> str:
    """ONNX Runtime's error, short: the op it ran and its message without the source location."""
    text = " ".join(str(err).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    reason = re.split(r"\.(?:cc|h):\d+ [^ ]*(?:\([^)]*\))?(?: const)? ", text)[-1]
    reason = reason.split(" was false. ")[-1]
    where = f"{node.group(1)} node '{node.group(2)}': " if node else ""
    return f"{type(err).__name__}: {where}{reason[:200]}"


def _is_acceptable(err: OnnxqError) -> bool:
    text = str(err)
    return "\n" not in text.strip() and any(
        type(err).__name__ == name and re.match(pattern, text) for name, pattern, _ in ACCEPTABLE_REFUSALS)


def session(model: onnx.ModelProto, optimized: bool = False) -> ort.InferenceSession:
    """A CPU session that logs nothing (the oracle reports ORT's errors itself), all optimizations on or off."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimized else level.ORT_DISABLE_ALL
    if model.ir_version > newest_ir_version():
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.ir_version = newest_ir_version()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _cosine(ref: np.ndarray, out: np.ndarray) -> float:
    a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if a.size < FEW_ELEMENTS and np.max(np.abs(a - b)) <= 0.1 * np.max(np.abs(a)) + FEW_ELEMENTS_ATOL:
        return 1.0  # cosine of one or two numbers compares their signs only: a loose absolute bound also passes
    if np.linalg.norm(a) < 1e-6:  # a (near) zero float output: only the size of the INT8 error matters (seed 330:
        # LeakyRelu(x) - LeakyRelu(x) is 0 in float, half a quantization step of unit-scale data in INT8)
        return 1.0 if np.max(np.abs(b), initial=0.0) <= FEW_ELEMENTS_ATOL else 0.0
    return float(a @ b / norms) if norms > 0 else 0.0


def _calibration(model: onnx.ModelProto, description: ModelDescription, seed: int) -> onnxq.FeedsSource:
    feeds = [random_feeds(description, 0, seed * 1000 + i) for i in range(CALIB_SAMPLES)]
    return onnxq.FeedsSource(feeds, f"fuzz {description.label}", onnxq.signature_of(model))


def _compare(quantized: onnx.ModelProto, model: onnx.ModelProto, description: ModelDescription,
             seed: int) -> str | None:
    """Why the quantized model is not "ok", or None."""
    try:
        onnx.checker.check_model(quantized, full_check=True)
    except Exception as err:  # the checker raises ValidationError or InferenceError
        return f"checker: {_first_line(err)}"
    feed = random_feeds(description, 1, seed * 1000 + 999)
    expected = session(model).run(None, feed)
    for optimized in (False, True):
        stage = f"ORT {'optimized' if optimized else 'unoptimized'}"
        try:
            got = session(quantized, optimized=optimized).run(None, feed)
        except Exception as err:  # onnxruntime's errors share no base class but Exception
            return f"{stage}: {_ort_error(err)}"
        for name, ref, out in zip(description.outputs, expected, got):
            if out.shape != ref.shape:
                return f"{stage}: output '{name}' has shape {out.shape}, float {ref.shape}"
            if not np.isfinite(out).all():
                return f"{stage}: output '{name}' is not finite"
            cosine = _cosine(ref, out)
            if cosine < COSINE_BOUND:
                return f"{stage}: output '{name}' cosine {cosine:.3f} < {COSINE_BOUND}"
    return None


def check_quantize(model: onnx.ModelProto, description: ModelDescription, target: str, method: str,
                   seed: int = 0) -> Outcome:
    """Quantize `model` for `target` with range method `method` on random calibration data and classify
    the result (module docstring). `seed` picks the calibration and evaluation data."""
    def outcome(kind: str, message: str = "") -> Outcome:
        return Outcome(kind, description.label, target, method, message)

    config = onnxq.QuantConfig(target=target, calib=onnxq.CalibConfig(method=onnxq.CalibMethod(method)))
    try:
        result = onnxq.quantize(model, _calibration(model, description, seed), config)
    except OnnxqError as err:
        return outcome("refused" if _is_acceptable(err) else "failure", f"quantize: {_first_line(err)}")
    except Exception as err:  # InternalError and anything else is an onnxq bug
        return outcome("failure", f"quantize: {_first_line(err)}")
    problem = _compare(result.model, model, description, seed)
    return outcome("failure", problem) if problem else outcome("ok")
