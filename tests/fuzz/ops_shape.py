"""Random element-wise ops, activations and shape ops: Add/Mul/Sub/Div, Relu/Clip/Sigmoid/HardSwish/LeakyRelu,
Concat, Split, Slice, Reshape (also to a shape read with Shape), Transpose, Flatten, Squeeze, Unsqueeze. Each takes its signature at the
model's opset (axes and split sizes as attributes before opset 13, as inputs from 13 on; Split's
num_outputs from 18). Same contract as `ops_layers`: True when a node was added."""

from __future__ import annotations

import numpy as np

from tests.fuzz.builder import Builder, Shape, Tensor, choice

__all__ = ["SHAPE_OPS"]

INT64_MAX = np.iinfo(np.int64).max


def _same_shape(b: Builder, x: Tensor, axis: int | None = None) -> list[Tensor]:
    """Tensors on offer whose shapes equal `x`'s in both worlds (on every axis but `axis`)."""
    def matches(t: Tensor) -> bool:
        return t.rank == x.rank and all(
            a == axis or (t.shapes[0][a], t.shapes[1][a]) == (x.shapes[0][a], x.shapes[1][a]) for a in range(x.rank))
    return [t for t in b.pool if matches(t)]


def emit_binary(b: Builder, x: Tensor, op: str) -> bool:
    partners = [t for t in _same_shape(b, x) if t.name != x.name]
    if op != "Div" and partners and b.draw.chance(0.5):
        other = b.pick(partners).name
        b.features.add("binary_two_activations")
    else:
        broadcast = [()] + ([(x.dim(-1),)] if x.static(-1) else [])
        broadcast += [(x.dim(1), 1, 1)] if x.rank == 4 and x.static(1) else []
        shape = choice(b.draw, broadcast)
        low, high = {"Add": (-1.0, 1.0), "Sub": (-1.0, 1.0), "Mul": (0.5, 2.0), "Div": (0.5, 2.0)}[op]
        other = b.values(shape, low, high, "operand")
        if op != "Div" and b.draw.chance(0.3):  # the constant first (never a division by an activation)
            (y,) = b.node(op, [other, x.name])
            b.add(y, x.shapes)
            return True
    (y,) = b.node(op, [x.name, other])
    b.add(y, x.shapes)
    return True


def emit_activation(b: Builder, x: Tensor, op: str) -> bool:
    inputs, attrs = [x.name], {}
    if op == "Clip":
        low, high = choice(b.draw, [(0.0, 6.0), (-1.0, 1.0), (None, 2.0), (0.0, None)])
        inputs += ["" if low is None else b.constant(np.float32(low), "clip_min"),
                   "" if high is None else b.constant(np.float32(high), "clip_max")]
        while inputs[-1] == "":
            inputs.pop()
    elif op == "LeakyRelu":
        attrs["alpha"] = choice(b.draw, [0.1, 0.01, 0.2])
    (y,) = b.node(op, inputs, **attrs)
    b.add(y, x.shapes)
    return True


def emit_concat(b: Builder, x: Tensor) -> bool:
    axis = choice(b.draw, [1, x.rank - 1])
    partners = _same_shape(b, x, axis)
    other = b.pick(partners)  # x itself is among them
    shapes = tuple((*s[:axis], s[axis] + o[axis], *s[axis + 1:]) for s, o in zip(x.shapes, other.shapes))
    if not b.fits(*shapes):
        return False
    (y,) = b.node("Concat", [x.name, other.name], axis=axis)
    b.add(y, shapes)
    return True


def emit_split(b: Builder, x: Tensor) -> bool:
    axes = [a for a in range(1, x.rank) if x.static(a) and x.dim(a) >= 2]
    if not axes:
        return False
    axis = choice(b.draw, axes)
    size = x.dim(axis)
    parts = b.draw.integer(2, min(3, size))
    even = size % parts == 0 and b.draw.chance(0.5)
    sizes = [size // parts] * parts if even else [1] * (parts - 1) + [size - parts + 1]
    inputs, attrs = [x.name], {"axis": axis}
    if b.opset >= 18 and even and b.draw.chance(0.5):
        attrs["num_outputs"] = parts
    elif b.opset >= 13:
        if not even or b.opset >= 18 or b.draw.chance(0.5):
            inputs.append(b.ints(sizes, "split"))
    elif not even or b.draw.chance(0.5):
        attrs["split"] = sizes
    outputs = b.node("Split", inputs, outputs=parts, **attrs)
    for name, part in zip(outputs, sizes):
        b.add(name, tuple((*s[:axis], part, *s[axis + 1:]) for s in x.shapes))
    return True


def emit_slice(b: Builder, x: Tensor) -> bool:
    axis = b.draw.integer(1, x.rank - 1)
    step = choice(b.draw, [1, 2, -1])
    dynamic = not x.static(axis)
    if step < 0:
        start, end = -1, -INT64_MAX  # the whole axis, reversed
    elif dynamic or x.dim(axis) < 2:
        start, end = (1 if min(s[axis] for s in x.shapes) >= 2 else 0), INT64_MAX
    else:
        start = b.draw.integer(0, x.dim(axis) - 1)
        end = b.draw.integer(start + 1, x.dim(axis))

    def length(n: int) -> int:
        if step < 0:
            return n
        first, last = min(start, n), min(end, n)
        return max(0, -(-(last - first) // step))

    shapes = tuple((*s[:axis], length(s[axis]), *s[axis + 1:]) for s in x.shapes)
    if not b.fits(*shapes):
        return False
    inputs = [x.name, b.ints([start]), b.ints([end]), b.ints([axis])]
    if step != 1 or b.draw.chance(0.5):
        inputs.append(b.ints([step]))
    (y,) = b.node("Slice", inputs)
    b.add(y, shapes)
    return True


def emit_reshape(b: Builder, x: Tensor) -> bool:
    if not x.fully_static():
        return False
    dims = list(x.shapes[0][1:])
    total = int(np.prod(dims))
    factor = next((f for f in (2, 3) if x.dim(1) % f == 0), None)
    options = [[0, -1]] + ([[0, factor, -1]] if factor else []) + ([[0, *dims[::-1]]] if x.rank > 2 else [])
    target = choice(b.draw, options)
    rest = [total // int(np.prod([d for d in target[1:] if d != -1])) if d == -1 else d for d in target[1:]]
    (y,) = b.node("Reshape", [x.name, b.ints(target, "shape")])
    b.add(y, tuple((s[0], *rest) for s in x.shapes))
    return True


def emit_transpose(b: Builder, x: Tensor) -> bool:
    rest = list(range(1, x.rank))
    order = [rest.pop(b.draw.integer(0, len(rest) - 1)) for _ in range(len(rest))]
    if order == sorted(order):
        order = order[::-1]
    perm = [0, *order]
    (y,) = b.node("Transpose", [x.name], perm=perm)
    b.add(y, tuple(tuple(s[p] for p in perm) for s in x.shapes))
    return True


def emit_flatten(b: Builder, x: Tensor) -> bool:
    (y,) = b.node("Flatten", [x.name], axis=1)
    b.add(y, tuple((s[0], int(np.prod(s[1:]))) for s in x.shapes))
    return True


def _axes(b: Builder, x: Tensor, op: str, axes: list[int]) -> tuple[list[str], dict]:
    if b.opset >= 13:
        return [x.name, b.ints(axes, "axes")], {}
    return [x.name], {"axes": axes}


def emit_squeeze(b: Builder, x: Tensor) -> bool:
    ones = [a for a in range(1, x.rank) if x.shapes[0][a] == x.shapes[1][a] == 1]
    if not ones or x.rank <= 2:
        return False
    axis = choice(b.draw, ones)
    inputs, attrs = _axes(b, x, "Squeeze", [axis])
    (y,) = b.node("Squeeze", inputs, **attrs)
    b.add(y, tuple(s[:axis] + s[axis + 1:] for s in x.shapes))
    return True


def emit_unsqueeze(b: Builder, x: Tensor) -> bool:
    axis = b.draw.integer(1, x.rank)
    inputs, attrs = _axes(b, x, "Unsqueeze", [axis])
    (y,) = b.node("Unsqueeze", inputs, **attrs)
    if x.rank + 1 >= 6:
        b.features.add("rank6")
    b.add(y, tuple((*s[:axis], 1, *s[axis:]) for s in x.shapes))
    return True


def emit_shape_reshape(b: Builder, x: Tensor) -> bool:
    """x -> Reshape(x, Concat([-1], Shape(x)[1:])): the same shape, read from the graph. The shape without its
    batch axis is Shape(start=1) from opset 15 (onnx-graphsurgeon's folding once read it as the whole shape:
    issue 12 bug 6), Shape -> Slice before."""
    if b.opset >= 15:
        (dims,) = b.node("Shape", [x.name], start=1)
        b.features.add("shape_start")
    else:
        (whole,) = b.node("Shape", [x.name])
        (dims,) = b.node("Slice", [whole, b.ints([1]), b.ints([INT64_MAX])])
    (target,) = b.node("Concat", [b.ints([-1], "batch"), dims], axis=0)
    (y,) = b.node("Reshape", [x.name, target])
    b.add(y, x.shapes)
    return True


def _any(x: Tensor) -> bool:
    return True


SHAPE_OPS = [
    ("Relu", 11, _any, lambda b, x: emit_activation(b, x, "Relu")),
    ("Add", 11, _any, lambda b, x: emit_binary(b, x, "Add")),
    ("Mul", 11, _any, lambda b, x: emit_binary(b, x, "Mul")),
    ("Sub", 11, _any, lambda b, x: emit_binary(b, x, "Sub")),
    ("Div", 11, _any, lambda b, x: emit_binary(b, x, "Div")),
    ("Clip", 11, _any, lambda b, x: emit_activation(b, x, "Clip")),
    ("Sigmoid", 11, _any, lambda b, x: emit_activation(b, x, "Sigmoid")),
    ("HardSwish", 14, _any, lambda b, x: emit_activation(b, x, "HardSwish")),
    ("LeakyRelu", 11, _any, lambda b, x: emit_activation(b, x, "LeakyRelu")),
    ("Concat", 11, lambda x: x.rank >= 2, emit_concat),
    ("Split", 11, lambda x: x.rank >= 2, emit_split),
    ("Slice", 11, lambda x: x.rank >= 2, emit_slice),
    ("Reshape", 11, lambda x: x.rank >= 2, emit_reshape),
    ("Shape", 11, lambda x: x.rank >= 2, emit_shape_reshape),
    ("Transpose", 11, lambda x: x.rank >= 3, emit_transpose),
    ("Flatten", 11, lambda x: x.rank >= 3, emit_flatten),
    ("Squeeze", 11, lambda x: x.rank >= 3, emit_squeeze),
    ("Unsqueeze", 11, lambda x: x.rank <= 5, emit_unsqueeze),
]
