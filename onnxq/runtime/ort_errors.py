"""ONNX Runtime's error messages made into one line a user can read: the failing node, the first lines of
its reason, no source locations or error-code prefixes."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["describe_array", "ort_message"]


def describe_array(value: Any) -> str:
    dtype = getattr(value, "dtype", type(value).__name__)
    return f"{dtype}{tuple(np.shape(value))}"


_ORT_CODE_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_NODE_FAILURE = re.compile(
    r"running (?P<op>\S+) node\. Name:'(?P<name>[^']*)' Status Message: (?P<rest>.*)", re.S
)
_NODE_NAME_PATTERNS = (
    re.compile(r"Name:'(?P<name>[^']+)'"),
    re.compile(r"\bNode \((?P<name>[^)]+)\)"),
    re.compile(r"\bnode '(?P<name>[^']+)'", re.I),
)
_SOURCE_LOCATION = re.compile(r"^\S+\.(?:cc|cpp|cu|h|hpp):\d+\s+")
# Detail lines after the first (e.g. "index: 0 Got: 3 Expected: 2") are kept if they are this short.
_DETAIL_LINE_MAX_CHARS = 80
_DETAIL_LINES_KEPT = 2


def _strip_source_location(text: str) -> str:
    """Drop a leading `file.cc:123 namespace::Function(args) ` that ORT puts before a message."""
    location = _SOURCE_LOCATION.match(text)
    if location is None:
        return text
    text = text[location.end() :]
    open_paren = text.find("(")
    if open_paren <= 0 or "::" not in text[:open_paren]:
        return text
    depth = 0
    for index in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            rest = text[index + 1 :].lstrip()
            return rest[len("const") :].lstrip() if rest.startswith("const ") else rest
    return text


def _one_line(text: str) -> str:
    """The first line of `text`, followed by up to two short detail lines, minus ORT's boilerplate."""
    lines = [line.strip() for line in _strip_source_location(text).splitlines() if line.strip()]
    if not lines:
        return ""
    details = [
        line for line in lines[1:] if len(line) <= _DETAIL_LINE_MAX_CHARS and not line.startswith("Please ")
    ]
    return "; ".join([lines[0], *details[:_DETAIL_LINES_KEPT]])


def ort_message(err: Exception) -> str:
    """One line from an ONNX Runtime exception, naming the node if ORT names one."""
    text = _ORT_CODE_PREFIX.sub("", str(err).strip())
    node_failure = _NODE_FAILURE.search(text)
    if node_failure is not None:
        detail = _one_line(node_failure["rest"].strip()) or "failed"
        return f"node '{node_failure['name']}' ({node_failure['op']}): {detail}"
    message = _one_line(text) or type(err).__name__
    for pattern in _NODE_NAME_PATTERNS:
        named = pattern.search(text)
        if named is not None:
            if named["name"] not in message:
                message = f"{message} (node '{named['name']}')"
            break
    return message
