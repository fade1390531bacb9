"""Run the unquantized float parts of a Q/DQ graph in float16, for strongly typed TensorRT.

TensorRT >= 10 builds strongly typed networks: a layer without Q/DQ runs in the type the ONNX graph
gives it. This pass runs after `insert_qdq` and rewrites the float32 graph into a float16 one:

    x(fp32) ─▶ Cast(fp16) ─▶ DQ(Q(x))(fp16 scale) ─▶ Conv(fp16, INT8 weights, fp16 bias) ─▶ …
    … ─▶ Cast(fp32) ─▶ Softmax(fp32) ─▶ Q(fp32 scale) ─▶ DQ(fp16 scale) ─▶ MatMul(fp16) ─▶ …
    … ─▶ y_float16 ─▶ Cast(fp32) ─▶ y(fp32)

How types are chosen, node by node in topological order, from the `onnx.defs` schema of each op at
the graph's opset:
  * A node runs in float16 when one of its float inputs carries activations (is computed from a
    float graph input or a DequantizeLinear) and its op is not kept. Every schema type variable the
    node's inputs bind to float32 becomes float16 if the schema allows it; inputs with a fixed type
    (Resize `scales` is `tensor(float)`) keep it. Clip min/max, Pad's constant value and
    BatchNormalization's parameters share their type variable with the data and follow it.
  * DequantizeLinear runs in float16 (float16 scale and output) unless all its consumers are kept;
    QuantizeLinear follows its input: the input and its scale must have one type (opset >= 19).
    A scale shared by a float32 Q and a float16 DQ is rounded to float16 in both copies, so the
    pair still agrees exactly; a weight whose scale changes on rounding (tiny, subnormal scales) is
    re-quantized to the new scale.
  * Kept nodes see exactly the input types they had before; Casts are inserted (one per tensor and
    type) wherever a tensor's new type differs from what its consumer needs.
  * Kept in float32: `DEFAULT_KEEP_FP32` (ops whose float16 results overflow or lose too much:
    normalisations, reductions, exp/log/pow/sqrt/erf, random and index-producing ops, Resize), ops
    outside the default domain (no schema to read), ops whose schema does not allow float16, and ops
    whose output type is set by an attribute that has no float16 meaning (Cast is the exception:
    `to=FLOAT` becomes `to=FLOAT16`). Float computations that only read shapes or other constants
    (shape arithmetic) also stay float32: they carry no activations.
  * Float32 initializers read in float16 are converted, clamped to ±65504 (a warning names each
    tensor that overflows; no inf is ever written). Q/DQ scales are rounded up and never reach
    zero; a scale whose INT8 range exceeds ±65504 is reported, since the tensor it quantizes
    overflows in float16 at run time. Integer initializers, INT8 weights included, are never
    touched. Graph inputs and outputs keep their names and float32 types.

Float16 Q/DQ scales need opset 19 (QuantizeLinear/DequantizeLinear-19): `upgrade_graph_opset`
converts the graph with the ONNX version converter first (`onnxq.passes.upgrade_opset`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.defs
import onnx_graphsurgeon as gs

from onnxq.graph.names import NameSource
from onnxq.errors import ModelError
from onnxq.passes.core import graph_pass
from onnxq.passes.upgrade_opset import DEFAULT_DOMAINS

__all__ = ["to_fp16", "DEFAULT_KEEP_FP32", "FP16_MIN_OPSET"]

log = logging.getLogger(__name__)

#: QuantizeLinear/DequantizeLinear accept float16 scales from this opset on.
FP16_MIN_OPSET = 19

#: Ops that stay float32 by default: float16 overflows or loses too much precision in them.
DEFAULT_KEEP_FP32: frozenset[str] = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "LpNormalization", "MeanVarianceNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceProd", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "CumSum",
    "Pow", "Sqrt", "Exp", "Log", "Erf",
    "Range", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "TopK", "NonMaxSuppression", "RoiAlign", "Resize",
})

FLOAT32 = np.dtype(np.float32)
FLOAT16 = np.dtype(np.float16)
FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT16_SMALLEST_NORMAL = float(np.finfo(np.float16).tiny)
_FLOAT16_SMALLEST_SUBNORMAL = float(np.finfo(np.float16).smallest_subnormal)
_TYPE_STRS = {FLOAT32: "tensor(float)", FLOAT16: "tensor(float16)"}
_SWITCHABLE = frozenset({FLOAT32, FLOAT16})
_QDQ_SCALE_INPUT = 1
_INT8_MAGNITUDE = 128


def _dtype(tensor: gs.Tensor) -> np.dtype | None:
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        return None  # onnx-only element types (bfloat16, float8) numpy cannot name


@dataclass
class _TypePlan:
    """What the rewrite will do: new Variable types, the type each node input needs, Cast targets."""

    dtypes: dict[str, np.dtype | None] = field(default_factory=dict)
    demands: list[tuple[gs.Node, int, np.dtype | None]] = field(default_factory=list)
    cast_to_float16: list[gs.Node] = field(default_factory=list)
    activations: set[str] = field(default_factory=set)

    def current(self, tensor: gs.Tensor) -> np.dtype | None:
        return self.dtypes.get(tensor.name, _dtype(tensor)) if tensor.name else None


def _schema(node: gs.Node, opset: int) -> onnx.defs.OpSchema | None:
    if (node.domain or "") not in DEFAULT_DOMAINS:
        return None
    try:
        return onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return None


def _formal_type_strs(formals: list, count: int) -> list[str]:
    """The type string of each actual input/output; a trailing variadic formal covers the rest."""
    if not formals:
        return []
    return [formals[min(index, len(formals) - 1)].type_str for index in range(count)]


def _fp16_signature(node: gs.Node, schema: onnx.defs.OpSchema) -> tuple[list, list] | None:
    """Input and output dtypes of `node` running in float16, or None if its schema cannot."""
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    binding: dict[str, np.dtype | None] = {}
    input_strs = _formal_type_strs(schema.inputs, len(node.inputs))
    for tensor, type_str in zip(node.inputs, input_strs):
        dtype = _dtype(tensor)
        if type_str in allowed and tensor.name and dtype is not None and type_str not in binding:
            to_half = dtype == FLOAT32 and _TYPE_STRS[FLOAT16] in allowed[type_str]
            binding[type_str] = FLOAT16 if to_half else dtype
    inputs = [binding.get(s, _dtype(t)) for t, s in zip(node.inputs, input_strs)]
    outputs = []
    for tensor, type_str in zip(node.outputs, _formal_type_strs(schema.outputs, len(node.outputs))):
        if type_str in binding:
            outputs.append(binding[type_str])
        elif node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            outputs.append(FLOAT16)
        elif type_str in allowed and len(allowed[type_str]) > 1 and node.op != "Cast":
            return None  # set by an attribute (stash_type, dtype): keep the node as it is
        else:
            outputs.append(_dtype(tensor))
    return inputs, outputs


def _statically_kept(node: gs.Node, keep: frozenset[str], opset: int) -> bool:
    return node.op in keep or _schema(node, opset) is None


def _wants_fp16(node: gs.Node, plan: _TypePlan, keep: frozenset[str], opset: int,
                consumers: Mapping[str, list[gs.Node]]) -> bool:
    if _statically_kept(node, keep, opset):
        return False
    if node.op == "DequantizeLinear":
        readers = [c for out in node.outputs for c in consumers.get(out.name, [])]
        return not readers or not all(_statically_kept(c, keep, opset) for c in readers)
    if node.op == "QuantizeLinear":
        return plan.current(node.inputs[0]) == FLOAT16
    return any(t.name in plan.activations for t in node.inputs)


def _plan_types(graph: gs.Graph, keep: frozenset[str]) -> _TypePlan:
    """Decide every node's input and output types, in topological order."""
    plan = _TypePlan()
    plan.activations = {t.name for t in graph.inputs if _dtype(t) in _SWITCHABLE}
    consumers: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            consumers.setdefault(tensor.name, []).append(node)
    for node in graph.nodes:
        signature = None
        if _wants_fp16(node, plan, keep, graph.opset, consumers):
            signature = _fp16_signature(node, _schema(node, graph.opset))
        if signature is None:
            signature = [_dtype(t) for t in node.inputs], [_dtype(t) for t in node.outputs]
        elif node.op == "Cast" and signature[1][0] == FLOAT16 and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            plan.cast_to_float16.append(node)
        input_types, output_types = signature
        plan.demands.extend((node, i, d) for i, d in enumerate(input_types) if node.inputs[i].name)
        for tensor, dtype in zip(node.outputs, output_types):
            plan.dtypes[tensor.name] = dtype
        if node.op == "DequantizeLinear" or any(t.name in plan.activations for t in node.inputs):
            plan.activations.update(t.name for t in node.outputs if _dtype(t) in _SWITCHABLE)
    return plan


def _cast(graph: gs.Graph, names: NameSource, source: gs.Tensor, dtype: np.dtype, name: str) -> gs.Variable:
    out = gs.Variable(name, dtype=dtype, shape=source.shape)
    to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    graph.nodes.append(gs.Node("Cast", names(f"{source.name}_Cast_{dtype.name}"), {"to": to},
                               inputs=[source], outputs=[out]))
    return out


def _retype_variables(graph: gs.Graph, plan: _TypePlan, names: NameSource) -> None:
    """Give Variables their new types and Cast the inputs whose type differs from the demand."""
    for node in graph.nodes:
        for tensor in node.outputs:
            if tensor.name in plan.dtypes and plan.dtypes[tensor.name] is not None:
                tensor.dtype = plan.dtypes[tensor.name]
    for node in plan.cast_to_float16:
        node.attrs["to"] = onnx.TensorProto.FLOAT16
    casts: dict[tuple[str, np.dtype], gs.Variable] = {}
    for node, index, demanded in plan.demands:
        tensor = node.inputs[index]
        actual = _dtype(tensor)
        if isinstance(tensor, gs.Constant) or actual == demanded or not {actual, demanded} <= _SWITCHABLE:
            continue
        key = (tensor.name, demanded)
        if key not in casts:
            casts[key] = _cast(graph, names, tensor, demanded, names(f"{tensor.name}_{demanded.name}"))
        node.inputs[index] = casts[key]


def _clamped_float16(values: np.ndarray, name: str) -> np.ndarray:
    overflow = np.abs(values) > FLOAT16_MAX  # inf too; NaN compares False
    if np.any(overflow):
        log.warning("initializer '%s': %d value(s) beyond the float16 range (largest magnitude %g) "
                    "clamped to ±%g", name, int(overflow.sum()), float(np.max(np.abs(values[overflow]))),
                    FLOAT16_MAX)
    return np.asarray(np.clip(values, -FLOAT16_MAX, FLOAT16_MAX), dtype=np.float16)


def _scale_float16(values: np.ndarray, name: str) -> np.ndarray:
    """A positive Q/DQ scale in float16: rounded up (never to zero), clamped to the range.

    The floor, 2^-24, is also the scale `weight_scales` gives dead channels, so only live scales
    that become subnormal are reported.
    """
    dequantized_max = float(np.max(values)) * _INT8_MAGNITUDE if values.size else 0.0
    if dequantized_max > FLOAT16_MAX:
        log.warning("scale '%s': dequantized values reach ±%g, beyond float16: the tensors it quantizes "
                    "overflow to inf in float16", name, dequantized_max)
    half = _clamped_float16(values, name)
    round_up = (half.astype(np.float32) < values) & (half < FLOAT16_MAX)
    half[round_up] = np.nextafter(half[round_up], np.float16(np.inf))
    half = np.asarray(np.maximum(half, np.float16(_FLOAT16_SMALLEST_SUBNORMAL)), dtype=np.float16)
    subnormal = (half > _FLOAT16_SMALLEST_SUBNORMAL) & (half < _FLOAT16_SMALLEST_NORMAL)
    if np.any(subnormal):
        log.warning("scale '%s': %d value(s) are float16 subnormals (smallest %g); runtimes that flush "
                    "subnormals will lose them", name, int(subnormal.sum()), float(half[subnormal].min()))
    return half


def _replace_values(constant: gs.Constant, values: np.ndarray) -> None:
    """New values for a Constant, exported with their own dtype (not the one it was imported with)."""
    constant.values = np.asarray(values)
    constant.export_dtype = None


def _is_scale(uses: Iterable[tuple[gs.Node, int]]) -> bool:
    return any(n.op in ("QuantizeLinear", "DequantizeLinear") and i == _QDQ_SCALE_INPUT for n, i in uses)


def _convert_constants(plan: _TypePlan, names: NameSource) -> dict[int, np.ndarray]:
    """Float16 versions of the float32 initializers read in float16; returns replaced scales.

    A constant read only in float16 is converted in place (it keeps its name); one also read in
    float32 gets a float16 copy. The result maps id(new scale constant) to its float32 values.
    """
    uses: dict[int, list[tuple[gs.Node, int, np.dtype]]] = {}
    constants: dict[int, gs.Constant] = {}
    for node, index, demanded in plan.demands:
        tensor = node.inputs[index]
        if isinstance(tensor, gs.Constant) and _dtype(tensor) == FLOAT32:
            constants[id(tensor)] = tensor
            uses.setdefault(id(tensor), []).append((node, index, demanded))
    replaced_scales: dict[int, np.ndarray] = {}
    for key, constant in constants.items():
        half_uses = [(n, i) for n, i, d in uses[key] if d == FLOAT16]
        if not half_uses:
            continue
        values = np.asarray(constant.values)
        scale = _is_scale(half_uses)
        half = _scale_float16(values, constant.name) if scale else _clamped_float16(values, constant.name)
        if len(half_uses) == len(uses[key]):
            target = constant
            _replace_values(target, half)
        else:
            target = gs.Constant(names(f"{constant.name}_float16"), half)
            for node, index in half_uses:
                node.inputs[index] = target
            if scale:  # the float32 copy (a Q's scale) agrees exactly with its DQ's float16 one
                _replace_values(constant, half.astype(np.float32))
        if scale:
            replaced_scales[id(target)] = values
    return replaced_scales


def _requantize_weights(graph: gs.Graph, replaced_scales: Mapping[int, np.ndarray], names: NameSource) -> None:
    """Re-quantize INT8 weights whose per-channel scale changed when rounded to float16."""
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or id(node.inputs[_QDQ_SCALE_INPUT]) not in replaced_scales:
            continue
        weights = node.inputs[0]
        if not isinstance(weights, gs.Constant) or _dtype(weights) != np.dtype(np.int8):
            continue
        old_scale = replaced_scales[id(node.inputs[_QDQ_SCALE_INPUT])]
        new_scale = np.asarray(node.inputs[_QDQ_SCALE_INPUT].values, dtype=np.float32)
        quantized = np.asarray(weights.values)
        shape = [1] * quantized.ndim
        if old_scale.ndim == 1:
            shape[node.attrs.get("axis", 1) % quantized.ndim] = old_scale.size
        ratio = (old_scale.astype(np.float64) / new_scale).reshape(shape if old_scale.ndim else ())
        requantized = np.clip(np.rint(quantized * ratio), -128, 127).astype(np.int8)
        if not np.array_equal(requantized, quantized):
            log.info("weight '%s' re-quantized to its float16 scale", weights.name)
            node.inputs[0] = gs.Constant(names(f"{weights.name}_float16_scale"), requantized)


def _restore_output_types(graph: gs.Graph, original: Mapping[str, np.dtype | None], names: NameSource) -> None:
    """Graph outputs computed in float16 get a Cast back to their original name and float32 type."""
    for position, output in enumerate(graph.outputs):
        wanted, actual = original[output.name], _dtype(output)
        if wanted == actual or not output.inputs:
            continue
        internal = gs.Variable(names(f"{output.name}_{actual.name}"), dtype=actual, shape=output.shape)
        producer = output.inputs[0]
        producer.outputs[producer.outputs.index(output)] = internal
        for reader in list(output.outputs):
            reader.inputs[reader.inputs.index(output)] = internal
        output.dtype = wanted
        graph.nodes.append(gs.Node("Cast", names(f"{output.name}_Cast_{wanted.name}"),
                                   {"to": onnx.helper.np_dtype_to_tensor_dtype(wanted)},
                                   inputs=[internal], outputs=[output]))
        graph.outputs[position] = output


def _check_supported(graph: gs.Graph) -> None:
    if graph.opset < FP16_MIN_OPSET:
        raise ModelError(f"float16 Q/DQ scales need opset {FP16_MIN_OPSET}, the graph is at opset "
                         f"{graph.opset}. Hint: convert it with upgrade_graph_opset first")
    for node in graph.nodes:
        if any(isinstance(value, gs.Graph) for value in node.attrs.values()):
            raise ModelError(f"node '{node.name}' ({node.op}) has a subgraph: --high-precision fp16 does "
                             "not support control flow yet. Hint: use --high-precision fp32")


@graph_pass
def to_fp16(graph: gs.Graph, *, keep_fp32_ops: frozenset[str] = DEFAULT_KEEP_FP32) -> gs.Graph:
    """Run every unquantized float32 part of `graph` in float16, except `keep_fp32_ops`.

    Args:
        graph: a (Q/DQ) graph at opset >= `FP16_MIN_OPSET` whose tensors carry their dtypes.
        keep_fp32_ops: op types that keep computing in float32, with Casts around them.

    Returns:
        The rewritten graph; its inputs and outputs keep their names and types.

    Raises:
        ModelError: the opset is too old, or the graph has control flow (If, Loop, Scan).
    """
    _check_supported(graph)
    graph.toposort()
    original_outputs = {t.name: _dtype(t) for t in graph.outputs}
    plan = _plan_types(graph, frozenset(keep_fp32_ops))
    names = NameSource(graph)
    _retype_variables(graph, plan, names)
    replaced_scales = _convert_constants(plan, names)
    _requantize_weights(graph, replaced_scales, names)
    _restore_output_types(graph, original_outputs, names)
    return graph
