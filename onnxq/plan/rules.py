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
    """

    activation_input: int
    weight_input: int
    weight_axis: Callable[[gs.Node, int], int]
    layout: str


WEIGHTED_OPS: Mapping[str, WeightedOp] = MappingProxyType({
    "Conv": WeightedOp(0, 1, _axis_0, "[K, C/g, k...]"),
    "ConvTranspose": WeightedOp(0, 1, _axis_1, "[C, K/g, k...]"),
    "Gemm": WeightedOp(0, 1, _gemm_axis, "[N, K] if transB else [K, N]"),
    "MatMul": WeightedOp(0, 1, _matmul_axis, "[..., K, N]"),
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
