"""The state a random graph is built in: the choices, the nodes and weights so far, and the tensors on offer.

Every tensor's shape is tracked in two "worlds": the dims the model is calibrated at (world 0) and other
values of its dynamic dims (world 1, a different batch and, when the model has dynamic spatial or sequence
dims, different sizes there). An axis whose size is the same in both worlds does not depend on a dynamic
dim, so constants (a Reshape target, a weight) may name it; one whose size differs may not.

Choices come from a `Draw`: `SeededDraw` (numpy, one model per seed) or, for shrinking a failure to a small
graph, `HypothesisDraw` (tests/fuzz/test_shrink.py). Each choice shrinks towards its first option, and the
op lists put the simplest first. Weight values come from a separate numpy generator so that they cost no
draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
from onnx import TensorProto, helper, numpy_helper

T = TypeVar("T")
Shape = tuple[int, ...]


class Draw(Protocol):
    def integer(self, low: int, high: int) -> int: ...  # inclusive bounds
    def chance(self, p: float) -> bool: ...


class SeededDraw:
    """Choices from a seeded numpy generator."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng([seed, 0])

    def integer(self, low: int, high: int) -> int:
        return int(self._rng.integers(low, high + 1))

    def chance(self, p: float) -> bool:
        return bool(self._rng.random() < p)


class HypothesisDraw:
    """Choices drawn through Hypothesis (the `draw` of a composite strategy, or `data.draw`), so that a
    failure shrinks: to the lowest integer, to False, to the first option."""

    def __init__(self, draw) -> None:
        from hypothesis import strategies as st

        self._draw, self._st = draw, st

    def integer(self, low: int, high: int) -> int:
        return self._draw(self._st.integers(low, high))

    def chance(self, p: float) -> bool:
        return self._draw(self._st.integers(0, 999)) >= round(1000 * (1.0 - p))


def choice(draw: Draw, options: Sequence[T]) -> T:
    return options[draw.integer(0, len(options) - 1)]


@dataclass(frozen=True)
class Tensor:
    """A float tensor of the graph and its shape in both worlds."""

    name: str
    shapes: tuple[Shape, Shape]

    @property
    def rank(self) -> int:
        return len(self.shapes[0])

    def static(self, axis: int) -> bool:
        return self.shapes[0][axis] == self.shapes[1][axis]

    def dim(self, axis: int) -> int:
        """The axis's size in world 0 (the calibration world)."""
        return self.shapes[0][axis]

    def fully_static(self, start: int = 1) -> bool:
        return all(self.static(axis) for axis in range(start, self.rank))


MAX_ELEMENTS = 6000  # per sample of world 1 (the larger): keeps a check fast


@dataclass
class Builder:
    draw: Draw
    rng: np.random.Generator  # weight values
    opset: int
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    pool: list[Tensor] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    weights_by_shape: dict[Shape, list[str]] = field(default_factory=dict)
    features: set[str] = field(default_factory=set)
    _count: int = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, value: np.ndarray, hint: str, as_node_p: float = 0.2) -> str:
        """A constant input: an initializer or (with probability `as_node_p`) a Constant node's output."""
        name = self.fresh(hint)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        if self.draw.chance(as_node_p):
            self.features.add("constant_node")
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}", value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def ints(self, values: Sequence[int], hint: str = "i64") -> str:
        return self.constant(np.asarray(values, np.int64), hint)

    def weight(self, shape: Shape, fan_in: int, hint: str = "w", shareable: bool = True) -> str:
        """A float weight of `shape`, He-scaled by `fan_in`; an earlier weight of that shape is reused
        (shared) now and then."""
        earlier = self.weights_by_shape.get(shape, [])
        if shareable and earlier and self.draw.chance(0.3):
            self.features.add("shared_weight")
            return choice(self.draw, earlier)
        value = (self.rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)
        name = self.constant(value, hint)
        if shareable:
            self.weights_by_shape.setdefault(shape, []).append(name)
        return name

    def values(self, shape: Shape, low: float, high: float, hint: str) -> str:
        return self.constant(self.rng.uniform(low, high, shape).astype(np.float32), hint)

    def node(self, op: str, inputs: Sequence[str], outputs: int = 1, **attrs) -> list[str]:
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=f"{op}_{self._count}", **attrs))
        self.consumed.update(inputs)
        return names

    @staticmethod
    def fits(*shapes: Shape) -> bool:
        """Whether every shape (one per world) is non-empty and small enough for a quick check."""
        return all(min(s, default=1) >= 1 and int(np.prod(s[1:], dtype=np.int64)) <= MAX_ELEMENTS for s in shapes)

    def add(self, name: str, shapes: tuple[Shape, Shape]) -> Tensor:
        """Offer a new tensor to later ops (its shapes checked with `fits` before its node was made)."""
        tensor = Tensor(name, shapes)
        self.pool.append(tensor)
        return tensor

    def pick(self, candidates: Sequence[Tensor]) -> Tensor:
        """One of `candidates`, most often among the newest (a chain, not only a fan-out of the input)."""
        recent = candidates[-3:]
        return choice(self.draw, list(reversed(recent))) if self.draw.chance(0.8) else choice(self.draw, candidates)


def float_value_info(name: str, dims: Sequence[int | str | None]):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))
