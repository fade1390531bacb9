"""Plan Q/DQ for ONNX Runtime's CPU provider: what its QDQ fusions turn into integer kernels.

ONNX Runtime rewrites `DQ -> op -> Q` groups into QLinear kernels (QLinearConv, QLinearMatMul, QGemm,
QLinearAdd, QLinearMul, QLinearAveragePool, QLinearGlobalAveragePool, QLinearConcat), drops
`DQ -> op -> Q` around data movement when input and output share scale and zero point, and removes a
Relu/Clip before a Q whose range already lies inside the activation's. So, unlike TensorRT, the
outputs of these ops are quantized too, after a Relu/Clip that follows them, and data-movement ops
share their input's scale. MatMul/Gemm outputs that no integer op reads stay float (ORT then runs
`DQ -> MatMul` as MatMulIntegerToFloat / QGemm with float output). Biases of Conv/Gemm become INT32
with scale s_input * s_weight, which QLinearConv and QGemm take directly. Activations are uint8 with a
zero point from the calibrated range; weights int8 symmetric per channel (the u8s8 kernels x86 has).
Source: ONNX Runtime docs, "Quantize ONNX models" (QDQ format, u8s8 on x86) and the QDQ selector
rules of its graph optimizer.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dataclasses import dataclass

from onnxq.graph.query import GraphIndex, is_constant, is_float
from onnxq.lower.scales import UINT8_ASYMMETRIC, ActivationScheme
from onnxq.options import Selection
from onnxq.passes.core import GraphPass
from onnxq.passes.shuffle_to_gather import shuffle_to_gather
from onnxq.plan.core import PlanDraft, QuantizedBias, QuantPlan, float_reason, plan_rule_ops, plan_weighted
from onnxq.plan.residual import feeds_softmax
from onnxq.plan.rules import WEIGHTED_OPS, default_float_reason, float_reasons, ort_fusion_break
from onnxq.plan.scale_groups import TensorGroups
from onnxq.targets.base import QuantTarget

__all__ = ["OrtCpu", "QLINEAR_OPS", "SAME_SCALE_OPS"]

_RUNTIME = "ONNX Runtime"
_FLOAT_REASONS = float_reasons(_RUNTIME)
_DEFAULT_FLOAT_REASON = default_float_reason(_RUNTIME)

# Ops ORT runs as integer kernels when every float input and the output are quantized.
QLINEAR_OPS = frozenset({"Conv", "MatMul", "Gemm", "Add", "Mul", "AveragePool", "GlobalAveragePool", "Concat"})
# Element-wise QLinear ops: worth it only when every input already comes out of an integer kernel;
# otherwise the extra Q/DQ around them costs more than the float op (measured on PP-OCR's HardSwish).
ELEMENTWISE_OPS = frozenset({"Add", "Mul"})
# Ops whose DQ -> op -> Q ORT drops when both sides share one scale and zero point. (MaxPool is left
# out: ORT's uint8 MaxPool measured 5x slower than its float one on PP-OCR.)
SAME_SCALE_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Gather"})
# Activations ORT folds into the following Q (their range contains the Q's range).
ABSORBED_OPS = frozenset({"Relu", "Clip"})
# Outputs quantized only when an integer kernel reads them.
FLOAT_OUTPUT_OK = frozenset({"MatMul", "Gemm"})


def _absorbed_output(node: gs.Node, index: GraphIndex) -> gs.Tensor:
    """The op's output, or the output of a single Relu/Clip (constant bounds) that alone reads it."""
    out = node.outputs[0]
    uses = index.uses(out)
    if len(uses) == 1 and not index.is_graph_output(out):
        reader = uses[0][0]
        if reader.op in ABSORBED_OPS and all(is_constant(t) for t in reader.inputs[1:] if t.name):
            return reader.outputs[0]
    return out


def _read_by_integer_op(tensor: gs.Tensor, index: GraphIndex) -> bool:
    """True if a reader of `tensor` can be an integer kernel: not an element-wise op with a constant
    input (a bias Add after a MatMul stays float, so a Q/DQ on the MatMul's output would only add error)."""
    return any((node.op in SAME_SCALE_OPS and ort_fusion_break(node) is None)
               or (node.op in QLINEAR_OPS
                   and (node.op in WEIGHTED_OPS or not any(is_constant(t) for t in node.inputs if t.name)))
               for node, _ in index.uses(tensor))


def _quantize_tensor(draft: PlanDraft, tensor: gs.Tensor, reason: str) -> None:
    """Every reader of `tensor` reads its DQ (the producer can then emit uint8 directly), except a reader
    whose fusion breaks ORT (`ort_fusion_break`): it reads the float tensor, so that no DQ -> op -> Q
    group forms around it whatever its output gets."""
    if draft.index.is_graph_output(tensor) or not is_float(tensor) or is_constant(tensor):
        return
    for node, i in draft.index.uses(tensor):
        if ort_fusion_break(node) is None:
            draft.edges.setdefault(tensor.name, {})[(node.name, i)] = reason


def _integer_produced(tensor: gs.Tensor, draft: PlanDraft) -> bool:
    """True if an integer kernel planned so far emits `tensor` (possibly through a folded Relu/Clip)."""
    producer = draft.index.producer(tensor)
    if producer is not None and producer.op in ABSORBED_OPS:
        producer = draft.index.producer(producer.inputs[0])
    decision = draft.decisions.get(producer.name) if producer is not None else None
    return decision is not None and decision.quantized and producer.op not in FLOAT_OUTPUT_OK


def _bias_target(node: gs.Node, draft: PlanDraft) -> QuantizedBias | None:
    bias_index = 2
    if node.op not in ("Conv", "Gemm") or len(node.inputs) <= bias_index or not is_constant(node.inputs[bias_index]):
        return None
    weight = next((w for w in draft.weights if w.consumer == node.name), None)
    bias = node.inputs[bias_index]
    if weight is None or np.asarray(bias.values).ndim != 1:
        return None
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
        return None
    return QuantizedBias(bias.name, node.name, bias_index, node.inputs[0].name, weight.tensor_name, weight.axis)


def _plan_qlinear(node: gs.Node, draft: PlanDraft) -> str | None:
    """Quantize a QLinear op's inputs, weight, bias and output; or say why it stays float."""
    unfusable = ort_fusion_break(node)
    if unfusable is not None:
        return unfusable
    variables = [t for _, t in draft.index.variable_inputs(node)]
    if not any(is_float(t) for t in node.outputs):
        return "works on integer/shape tensors: nothing to quantize"
    if not variables or not all(is_float(t) for t in variables):
        return "has no float activation input"
    if node.op in WEIGHTED_OPS:
        why_not = plan_weighted(node, draft)
        if why_not is not None:
            return why_not
        bias = _bias_target(node, draft)
        if bias is not None:
            draft.biases.append(bias)
    elif any(is_constant(t) for t in node.inputs if t.name):
        return "element-wise op with a constant input: kept float"
    elif node.op == "Add" and feeds_softmax(node.outputs[0], draft.index):
        return "attention-mask Add (feeds Softmax): mask arithmetic stays float"
    elif node.op in ELEMENTWISE_OPS and not all(_integer_produced(t, draft) for t in variables):
        return f"{node.op} of a float-computed input: Q/DQ around it would cost more than it saves"
    for tensor in variables:
        _quantize_tensor(draft, tensor, f"input of {node.op} (QLinear kernel)")
    out = _absorbed_output(node, draft.index)
    if node.op not in FLOAT_OUTPUT_OK or _read_by_integer_op(out, draft.index):
        _quantize_tensor(draft, out, f"output of {node.op} (QLinear kernel needs a quantized output)")
    return None


def _plan(graph: gs.Graph, selection: Selection, quantize_attention: bool) -> QuantPlan:
    """Plan uint8-activation / int8-weight Q/DQ that ONNX Runtime's CPU provider fuses."""
    draft = PlanDraft(GraphIndex.build(graph), _RUNTIME, quantize_attention)
    groups = TensorGroups()
    nodes = list(graph.nodes)
    plan_rule_ops(nodes, draft, selection, QLINEAR_OPS, _plan_qlinear, "{op}: ONNX Runtime integer kernel")
    for node in nodes:  # graph order: a producer's output is marked before its consumers are visited
        if node.name in draft.decisions or node.op not in SAME_SCALE_OPS:
            continue
        unfusable = ort_fusion_break(node)
        if unfusable is not None:
            draft.decide(node, False, unfusable)
            continue
        source, out = node.inputs[0], node.outputs[0]
        if source.name in draft.edges and is_float(out) and not draft.index.is_graph_output(out):
            _quantize_tensor(draft, out, f"output of {node.op}: shares its input's scale so ORT drops the Q/DQ")
            groups.union(source.name, out.name)
            draft.decide(node, True, f"{node.op} on uint8: same scale on both sides")
    for node in nodes:
        if node.name not in draft.decisions:
            reason = float_reason(node, draft, _FLOAT_REASONS, _DEFAULT_FLOAT_REASON)
            if node.op in ABSORBED_OPS:
                reason = "activation: folded into the following QuantizeLinear by ONNX Runtime"
            draft.decide(node, False, reason)
    return draft.finish(nodes, groups.find)


@dataclass(frozen=True)
class OrtCpu(QuantTarget):
    """ONNX Runtime's CPU provider: uint8 activations, int8 per-channel weights, int32 biases.

    Attention MatMuls are quantized by default (ORT's integer MatMul is where its speed-up on
    transformers comes from; its own quantize_static does the same), and the latency search runs by
    default, because whether an integer kernel beats its float one depends on the machine.
    """

    name: str = "ort-cpu"
    runtime: str = _RUNTIME
    scheme: ActivationScheme = UINT8_ASYMMETRIC
    prepare_passes: tuple[GraphPass, ...] = (shuffle_to_gather,)
    quantize_attention: bool = True
    latency_search: bool = True

    def plan(self, graph: gs.Graph, selection: Selection) -> QuantPlan:
        return _plan(graph, selection, self.attention_quantized(selection))
