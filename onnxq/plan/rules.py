"""TensorRT's explicit-quantization placement rules, as tables.

Sources: TensorRT Developer Guide, "Working with INT8 / Q/DQ placement recommendations" (quantize all
inputs of weighted ops, per-channel weights and per-tensor activations, do not quantize weighted-op
outputs, quantize the residual input of skip connections, do not simulate BN/ReLU fusion) and the
ONNX parser's Q/DQ rules (symmetric INT8, explicit axis, positive scales, float bias).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import onnx_graphsurgeon as gs

__all__ = [
    "WeightedOp",
    "WEIGHTED_OPS",
    "POOLING_OPS",
    "PASS_THROUGH_OPS",
    "EPILOGUE_OPS",
    "float_reasons",
    "default_float_reason",
    "ORT_FUSION_BREAKS",
    "ort_fusion_break",
]


def _axis_0(node: gs.Node, weight_rank: int) -> int:
    return 0


def _axis_1(node: gs.Node, weight_rank: int) -> int:
    return 1


def _gemm_axis(node: gs.Node, weight_rank: int) -> int:
    # B is [N, K] when transB=1 (PyTorch Linear layout) and [K, N] otherwise; N is the output channel.
    return 0 if int(node.attrs.get("transB", 0)) else 1


def _matmul_axis(node: gs.Node, weight_rank: int) -> int:
    # A constant B is [..., K, N]: its last axis holds the output channels.
    return weight_rank - 1


@dataclass(frozen=True)
class WeightedOp:
    """An op TensorRT runs as an INT8 kernel when its activation input and weight are both quantized.

    Attributes:
        activation_input: index of the input quantized per-tensor.
        weight_input: index of the constant weight quantized per-channel.
        weight_axis: the weight's output-channel axis, from the node and the weight's rank.
        layout: how the weight is laid out, for the plan's reasons.
        weight_ranks: the weight ranks a per-channel scale is written for (None: any); a weight of
            another rank keeps the op float, saying `weight_rank_reason`.
        weight_rank_reason: why, with {rank} and {weight} filled in.
    """

    activation_input: int
    weight_input: int
    weight_axis: Callable[[gs.Node, int], int]
    layout: str
    weight_ranks: frozenset[int] | None = None
    weight_rank_reason: str = ""


WEIGHTED_OPS: Mapping[str, WeightedOp] = MappingProxyType({
    "Conv": WeightedOp(0, 1, _axis_0, "[K, C/g, k...]"),
    "ConvTranspose": WeightedOp(0, 1, _axis_1, "[C, K/g, k...]"),
    "Gemm": WeightedOp(0, 1, _gemm_axis, "[N, K] if transB else [K, N]"),
    # ONNX Runtime fuses DQ -> MatMul into MatMulIntegerToFloat / QLinearMatMul, whose weight scale is a
    # scalar, a per-column vector for a 2-D weight, or a tensor of the weight's rank: a per-axis
    # DequantizeLinear of a rank >= 3 weight fails there at run time ("b zero point is not valid"), for
    # the trt target's models too (onnxq's own steps and users run them in ORT). A [1, .., 1, K, N] weight
    # is made 2-D beforehand (`onnxq.passes.squeeze_matmul_weights`).
    "MatMul": WeightedOp(0, 1, _matmul_axis, "[..., K, N]", frozenset({2}),
                         "weight '{weight}' has rank {rank}: ONNX Runtime's integer MatMul takes a per-channel "
                         "weight scale for a 2-D weight only; kept float"),
})

# Quantized only when a neighbour is: DQ -> pool -> Q fuses into an INT8 pooling kernel.
POOLING_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})

# Ops TensorRT moves Q/DQ across (pure data movement on per-tensor scales; Concat when scales match).
PASS_THROUGH_OPS = frozenset({
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Concat",
})

# Ops TensorRT fuses into the epilogue of a preceding Conv/GEMM (with one constant input where binary).
EPILOGUE_OPS = frozenset({
    "BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid",
    "Tanh", "Elu", "Selu", "Softplus", "Identity", "Add", "Sub", "Mul", "Div",
})


def _dilated_pool(node: gs.Node) -> str | None:
    dilations = [int(d) for d in node.attrs.get("dilations", ())]
    if any(d != 1 for d in dilations):
        return (f"AveragePool with dilations {dilations}: ONNX Runtime fuses DQ -> AveragePool -> Q into "
                "QLinearAveragePool, which has no dilations (the optimized model is invalid); kept float")
    return None


def _unfusable_resize(node: gs.Node) -> str | None:
    if node.attrs.get("mode", "nearest") == "cubic":
        return ("cubic Resize: ONNX Runtime's fused uint8 Resize fails on cubic scales once its layout "
                "transformer moves it to NHWC; kept float")
    if "axes" in node.attrs:
        return ("Resize with the axes attribute (opset 18): ONNX Runtime's fused uint8 Resize indexes its "
                "scales out of bounds; kept float")
    return None


def _softmax(node: gs.Node) -> str | None:
    return ("Softmax: ONNX Runtime fuses DQ -> Softmax -> Q into QLinearSoftmax, whose uint8 output wraps a "
            "probability of exactly 1 to 0 (a Softmax over an axis of size 1 gave 0 instead of 1); its input is "
            "read in float")


# Ops whose DQ -> op -> Q group ONNX Runtime's graph optimizer turns into a model that fails to load or
# run, or runs wrongly (measured with onnxruntime 1.31, tests/regressions/test_unfusable_qdq.py): by op type, the check
# giving the reason or None. Both targets consult it (the trt target's models run in ORT too).
ORT_FUSION_BREAKS: Mapping[str, Callable[[gs.Node], str | None]] = MappingProxyType({
    "AveragePool": _dilated_pool,
    "Resize": _unfusable_resize,
    "Softmax": _softmax,
})


def ort_fusion_break(node: gs.Node) -> str | None:
    """Why Q/DQ around `node` breaks ONNX Runtime's fusion of it (None: it does not)."""
    check = ORT_FUSION_BREAKS.get(node.op)
    return None if check is None else check(node)


def float_reasons(runtime: str) -> Mapping[str, str]:
    """Why each op type outside the INT8 rules stays float, as `runtime` ("TensorRT", "ONNX Runtime") runs it."""
    fused = f"activation: {runtime} fuses it into the preceding layer; its input stays as produced"
    movement = f"data movement: {runtime} moves Q/DQ across it, no Q/DQ of its own"
    sensitive = f"numerically sensitive: kept in high precision ({runtime} runs it in float)"
    pointwise = f"element-wise arithmetic: kept in high precision ({runtime} fuses pointwise chains in float)"
    shape = "shape or index computation: not a quantizable tensor"
    control_flow = "control flow: its subgraphs are not quantized"
    return MappingProxyType({
        **{op: fused for op in (
            "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
            "Selu", "Softplus", "Gelu", "Mish", "ThresholdedRelu")},
        **{op: movement for op in (
            "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice", "Split",
            "Gather", "GatherElements", "GatherND", "Pad", "Expand", "Tile", "Resize", "Upsample",
            "DepthToSpace", "SpaceToDepth", "Concat")},
        **{op: sensitive for op in (
            "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
            "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "Sqrt", "Pow", "Exp", "Log",
            "Erf", "Reciprocal", "TopK", "ArgMax", "ArgMin", "CumSum", "Einsum", "LSTM", "GRU", "RNN")},
        **{op: shape for op in (
            "Shape", "Size", "ConstantOfShape", "Range", "NonZero", "Cast", "CastLike", "Equal", "Less",
            "Greater", "Not", "And", "Or", "Where", "Constant", "OneHot")},
        **{op: pointwise for op in ("Add", "Sub", "Mul", "Div", "Neg", "Abs", "Max", "Min", "Sum", "Mean")},
        "BatchNormalization": "BatchNormalization not folded into a Conv: runs in float",
        **{op: control_flow for op in ("If", "Loop", "Scan")},
        "QuantizeLinear": "already a quantization node",
        "DequantizeLinear": "already a quantization node",
    })


def default_float_reason(runtime: str) -> str:
    """Why an op type no rule names stays float."""
    return f"not in {runtime}'s INT8 fusion rules: kept in high precision"
