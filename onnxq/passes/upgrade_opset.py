"""Raise a model's default-domain opset to at least `min_opset` with the ONNX version converter.

Rewrite: `ModelProto(opset < min_opset) -> ModelProto(opset == min_opset)`, op by op, by
`onnx.version_converter` (onnx-graphsurgeon cannot change opsets, so this step works on the
`ModelProto` before the graph passes). Per-channel `DequantizeLinear` (the `axis` attribute) needs
opset 13, hence the default. Models already at `min_opset` or newer are returned unchanged, as the
same object.
"""

from __future__ import annotations

import logging
import re

import onnx
import onnx.defs
import onnx.helper
import onnx.version_converter
import onnx_graphsurgeon as gs

from onnxq.errors import ModelError
from onnxq.io import from_graph, to_graph

__all__ = ["upgrade_opset", "upgrade_graph_opset", "default_opset", "DEFAULT_DOMAINS"]

log = logging.getLogger(__name__)

#: The names the ONNX default operator set goes by in `opset_import`.
DEFAULT_DOMAINS = ("", "ai.onnx")

_CARRIED_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")

# The converter's messages start with "<source file>:<line>: <function>: Assertion `<expr>` failed: ".
_ASSERTION_PREFIX = re.compile(r"^.*?Assertion `.*?` failed:\s*")
# e.g. "No Adapter From Version $10 for Range"
_ADAPTER_FOR_OP = re.compile(r"\bfor (?P<op>[A-Za-z_][A-Za-z0-9_]*)\s*$")


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default ONNX operator set `model` imports, or None if it imports none."""
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS:
            return int(opset.version)
    return None


def upgrade_opset(model: onnx.ModelProto, min_opset: int = 13) -> onnx.ModelProto:
    """Convert `model` to opset `min_opset` if its default-domain opset is older.

    The converted model keeps the original's producer fields, doc string and metadata, and gets the
    lowest IR version that supports its opsets (ONNX Runtime rejects the newest IR versions that
    onnx writes by default).

    Args:
        model: The model to upgrade. It is not modified.
        min_opset: The lowest acceptable default-domain opset.

    Returns:
        `model` itself when no conversion is needed, otherwise a new, converted model.

    Raises:
        ModelError: The version converter cannot convert the model.
    """
    current = default_opset(model)
    if current is None or current >= min_opset:
        return model
    log.info("converting the model from opset %d to opset %d", current, min_opset)
    try:
        converted = onnx.version_converter.convert_version(model, min_opset)
    except (RuntimeError, ValueError, TypeError, IndexError, onnx.checker.ValidationError) as err:
        raise ModelError(_conversion_failure(model, current, min_opset, err)) from None
    for field in _CARRIED_FIELDS:
        setattr(converted, field, getattr(model, field))
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    converted.ir_version = onnx.helper.find_min_ir_version_for(
        list(converted.opset_import), ignore_unknown=True)
    return converted


def _conversion_failure(model: onnx.ModelProto, current: int, target: int, err: Exception) -> str:
    """A one-line message for a failed conversion that names the op at fault when it can."""
    text = " ".join(str(err).split()) or type(err).__name__
    reason = _ASSERTION_PREFIX.sub("", text).rstrip(".")
    op_type = _failing_op(model, current, reason)
    if op_type is not None and not _has_schema(op_type, current):
        # The converter's own words here are an unformatted template or an adapter lookup.
        reason = (f"'{op_type}' is not part of opset {current}" if onnx.defs.has(op_type)
                  else f"'{op_type}' is not an ONNX op")
    where = f" at op '{op_type}'" if op_type is not None else ""
    return (f"cannot convert the model from opset {current} to opset {target}{where}: {reason}. "
            f"Hint: re-export the model at opset {target} or newer "
            f"(e.g. torch.onnx.export(..., opset_version=17)) and pass that file instead")


def _failing_op(model: onnx.ModelProto, current: int, reason: str) -> str | None:
    """The op type the converter failed on: named in its message, or one ONNX has no schema for."""
    named = _ADAPTER_FOR_OP.search(reason)
    if named is not None:
        return named.group("op")
    for node in model.graph.node:
        if node.domain in DEFAULT_DOMAINS and not _has_schema(node.op_type, current):
            return node.op_type
    return None


def _has_schema(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


def upgrade_graph_opset(graph: gs.Graph, min_opset: int) -> gs.Graph:
    """`graph` converted to opset `min_opset` by the ONNX version converter (unchanged if newer).

    Raises:
        ModelError: the converter cannot convert one of the graph's ops.
    """
    if graph.opset >= min_opset:
        return graph
    return to_graph(upgrade_opset(from_graph(graph), min_opset))
