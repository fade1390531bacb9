"""Random valid float ONNX models for fuzzing onnxq: `random_model(seed) -> (model, description)`.

One model per seed, the same on every machine: an opset from 11 to 21, one or two inputs (an image
[N, C, H, W], a sequence [N, S, D] or a vector [N, D]; the batch and the spatial or sequence dims dynamic or
not), then a chain of 1-10 ops drawn from `ops_layers.LAYER_OPS` and `ops_shape.SHAPE_OPS` (those the opset
has), each reading a recent tensor. Weights are initializers or Constant nodes, now and then shared by two
layers or tied (one [K, M] weight read as is by one layer and transposed by a Gemm). Every tensor nobody reads
is a graph output, and now and then one that is read mid-graph as well.

Every model passes onnx's full checker and runs in ONNX Runtime at both its calibration dims (world 0) and
other values of its dynamic dims (world 1): tests/fuzz/test_generator.py checks it for the seeds CI runs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from tests.fuzz.builder import Builder, Draw, HypothesisDraw, SeededDraw, Tensor, choice, float_value_info
from tests.fuzz.ops_layers import LAYER_OPS
from tests.fuzz.ops_shape import SHAPE_OPS

__all__ = ["ModelDescription", "random_model", "build_model", "random_feeds", "OPS", "HypothesisDraw"]

OPS = [*LAYER_OPS, *SHAPE_OPS]
OPSETS = (11, 21)


@dataclass(frozen=True)
class ModelDescription:
    """What a random model is: enough to reproduce, count coverage and feed it.

    Attributes:
        label: how it was made, e.g. "seed 17".
        opset: its default-domain opset.
        ops: op type -> node count (Constant nodes included).
        features: which variants it has (conv_depthwise, shared_weight, constant_node, dynamic_batch, ...).
        input_shapes: per world, input name -> concrete shape (world 0: calibration; world 1: other
            values of the dynamic dims).
        outputs: the graph output names.
    """

    label: str
    opset: int
    ops: Counter
    features: frozenset[str]
    input_shapes: tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]
    outputs: tuple[str, ...]

    def summary(self) -> str:
        ops = ", ".join(f"{op}x{n}" if n > 1 else op for op, n in sorted(self.ops.items()))
        return f"{self.label}: opset {self.opset}, {ops}; {', '.join(sorted(self.features)) or 'no variants'}"


def _inputs(draw: Draw, b: Builder) -> list[tuple[Tensor, list]]:
    """The graph inputs: their tensors (offered to the ops) and declared dims."""
    kind = choice(draw, ["image", "sequence", "image", "vector"])
    dynamic_batch = draw.chance(0.6)
    dynamic_space = kind != "vector" and draw.chance(0.35)
    n0 = 1 if dynamic_batch else draw.integer(1, 2)
    batch = ((n0, 3 if dynamic_batch else n0), "N" if dynamic_batch else n0)
    if kind == "image":
        h, w = draw.integer(5, 12), draw.integer(5, 12)
        dims = [batch, ((draw.integer(1, 8),) * 2, None)]
        dims += [((h, h + 3), "H"), ((w, w + 5), "W")] if dynamic_space else [((h, h), h), ((w, w), w)]
    elif kind == "sequence":
        s = draw.integer(2, 8)
        dims = [batch, ((s, s + 3), "S") if dynamic_space else ((s, s), s), ((draw.integer(4, 16),) * 2, None)]
    else:
        dims = [batch, ((draw.integer(4, 32),) * 2, None)]
    b.features.update({f"input_{kind}"} | ({"dynamic_batch"} if dynamic_batch else set())
                      | ({"dynamic_spatial"} if dynamic_space else set()))
    shapes = tuple(tuple(d[0][world] for d in dims) for world in (0, 1))
    declared = [d[1] if d[1] is not None else d[0][0] for d in dims]
    count = 2 if draw.chance(0.2) else 1
    return [(b.add(f"input_{i}", shapes), declared) for i in range(count)]


def build_model(draw: Draw, weight_seed: int, label: str) -> tuple[onnx.ModelProto, ModelDescription]:
    """A random model from `draw`'s choices and weights from `weight_seed`."""
    opset = draw.integer(*OPSETS)
    b = Builder(draw, np.random.default_rng([weight_seed, 1]), opset)
    inputs = _inputs(draw, b)
    wanted, added = draw.integer(1, 10), 0
    families = [[op for op in family if op[1] <= opset] for family in (LAYER_OPS, SHAPE_OPS)]
    for _ in range(wanted * 6):
        if added == wanted:
            break
        _, _, accepts, emit = choice(draw, choice(draw, families))
        candidates = [t for t in b.pool if accepts(t)]
        if candidates and emit(b, b.pick(candidates)):
            added += 1
    if not added:  # nothing fitted: a Relu fits anything
        emit_relu = next(op[3] for op in OPS if op[0] == "Relu")
        emit_relu(b, b.pool[-1])
    input_names = {t.name for t, _ in inputs}
    produced = [t for t in b.pool if t.name not in input_names]
    outputs = [t for t in produced if t.name not in b.consumed]
    mid = [t for t in produced if t.name in b.consumed]
    if mid and draw.chance(0.3):
        outputs.insert(0, choice(draw, mid))
        b.features.add("mid_graph_output")
    graph = helper.make_graph(
        b.nodes, f"fuzz_{label.replace(' ', '_')}",
        [float_value_info(t.name, declared) for t, declared in inputs],
        [float_value_info(t.name, [None] * t.rank) for t in outputs],
        initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxq-fuzz")
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    description = ModelDescription(
        label, opset, Counter(node.op_type for node in b.nodes), frozenset(b.features),
        tuple({t.name: t.shapes[world] for t, _ in inputs} for world in (0, 1)),
        tuple(t.name for t in outputs))
    return model, description


def random_model(seed: int) -> tuple[onnx.ModelProto, ModelDescription]:
    """The random model of `seed` (the same model for the same seed, everywhere)."""
    return build_model(SeededDraw(seed), seed, f"seed {seed}")


def random_feeds(description: ModelDescription, world: int, seed: int) -> dict[str, np.ndarray]:
    """One standard-normal feed at `world`'s dims."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in description.input_shapes[world].items()}
