"""BERT-like synthetic encoder: attention with an in-graph float32-min mask, LayerNormalization, GELU.

The graph follows what PyTorch exports for Hugging Face BERT at opset 17: linear layers are MatMul by a
[in, out] constant plus Add, heads are split with Reshape/Transpose, GELU is the exact Erf form.
See `builders_common` for the naming scheme.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from models.builders_common import BATCH_DIM, GraphBuilder, int64s, matmul_add, scalar

__all__ = ["build_transformer_encoder", "HIDDEN", "NUM_HEADS", "NUM_LAYERS", "SEQUENCE_DIM"]

SEQUENCE_DIM = "S"
HIDDEN = 32
NUM_HEADS = 4
HEAD_SIZE = HIDDEN // NUM_HEADS
FFN_HIDDEN = 64
NUM_LAYERS = 2
FLOAT32_MIN = float(np.finfo(np.float32).min)  # -3.4028234663852886e38


def _additive_mask(b: GraphBuilder, mask: str) -> str:
    """(1 - mask) * float32_min, unsqueezed to [N,1,1,S]: 0 where kept, float32 min where padded."""
    one = b.add_constant("mask/one", scalar(1.0))
    inverted = b.add_node("Sub", "mask/invert", [one, mask])
    fill = b.add_constant("mask/float32_min", scalar(FLOAT32_MIN))
    scaled = b.add_node("Mul", "mask/scale", [inverted, fill])
    axes = b.add_constant("mask/unsqueeze.axes", int64s([1, 2]))
    return b.add_node("Unsqueeze", "mask/unsqueeze", [scaled, axes])


def _shared_constants(b: GraphBuilder) -> dict[str, str]:
    """Shape and scalar constants that every layer reuses."""
    return {
        "split_heads": b.add_constant("attn.split_heads_shape", int64s([0, 0, NUM_HEADS, HEAD_SIZE])),
        "merge_heads": b.add_constant("attn.merge_heads_shape", int64s([0, 0, HIDDEN])),
        "scale": b.add_constant("attn.scale", scalar(math.sqrt(HEAD_SIZE))),
        "sqrt2": b.add_constant("gelu.sqrt2", scalar(math.sqrt(2.0))),
        "one": b.add_constant("gelu.one", scalar(1.0)),
        "half": b.add_constant("gelu.half", scalar(0.5)),
    }


def _heads(b: GraphBuilder, scope: str, x: str, shared: dict[str, str], perm: list[int]) -> str:
    """Project [N,S,32] with ``{scope}/matmul``+``/add``, reshape to [N,S,4,8], transpose by `perm`."""
    y = matmul_add(b, scope, x, HIDDEN, HIDDEN)
    y = b.add_node("Reshape", f"{scope}/reshape", [y, shared["split_heads"]])
    return b.add_node("Transpose", f"{scope}/transpose", [y], perm=perm)


def _attention(b: GraphBuilder, scope: str, x: str, mask: str, shared: dict[str, str]) -> str:
    """Multi-head self-attention; returns the output projection [N,S,32] (before the residual)."""
    query = _heads(b, f"{scope}/q_proj", x, shared, [0, 2, 1, 3])  # [N,4,S,8]
    key_t = _heads(b, f"{scope}/k_proj", x, shared, [0, 2, 3, 1])  # [N,4,8,S]
    value = _heads(b, f"{scope}/v_proj", x, shared, [0, 2, 1, 3])  # [N,4,S,8]
    scores = b.add_node("MatMul", f"{scope}/scores", [query, key_t])
    scores = b.add_node("Div", f"{scope}/scale", [scores, shared["scale"]])
    scores = b.add_node("Add", f"{scope}/add_mask", [scores, mask])
    probs = b.add_node("Softmax", f"{scope}/softmax", [scores], axis=-1)
    context = b.add_node("MatMul", f"{scope}/context", [probs, value])
    context = b.add_node("Transpose", f"{scope}/merge_transpose", [context], perm=[0, 2, 1, 3])
    context = b.add_node("Reshape", f"{scope}/merge_reshape", [context, shared["merge_heads"]])
    return matmul_add(b, f"{scope}/out_proj", context, HIDDEN, HIDDEN)


def _gelu(b: GraphBuilder, scope: str, x: str, shared: dict[str, str]) -> str:
    """Exact GELU as exported: x * (erf(x / sqrt2) + 1) * 0.5."""
    y = b.add_node("Div", f"{scope}/div", [x, shared["sqrt2"]])
    y = b.add_node("Erf", f"{scope}/erf", [y])
    y = b.add_node("Add", f"{scope}/add", [y, shared["one"]])
    y = b.add_node("Mul", f"{scope}/mul", [x, y])
    return b.add_node("Mul", f"{scope}/mul_half", [y, shared["half"]])


def _layer_norm(b: GraphBuilder, name: str, x: str, output: str | None = None) -> str:
    """LayerNormalization over the hidden axis with trained-looking gamma/beta."""
    gamma = (1.0 + b.rng.normal(0.0, 0.1, HIDDEN)).astype(np.float32)
    beta = b.small_bias(HIDDEN)
    inputs = [x, b.add_constant(f"{name}.scale", gamma), b.add_constant(f"{name}.bias", beta)]
    return b.add_node(
        "LayerNormalization", name, inputs, output=output, axis=-1, epsilon=1e-12
    )


def _encoder_layer(
    b: GraphBuilder, scope: str, x: str, mask: str, shared: dict[str, str], output: str | None
) -> str:
    """Post-LN encoder layer: attention + residual + LN, FFN + residual + LN."""
    attended = _attention(b, f"{scope}/attn", x, mask, shared)
    y = b.add_node("Add", f"{scope}/attn_residual", [attended, x])
    y = _layer_norm(b, f"{scope}/attn_norm", y)
    hidden = matmul_add(b, f"{scope}/ffn/fc1", y, HIDDEN, FFN_HIDDEN)
    hidden = _gelu(b, f"{scope}/ffn/gelu", hidden, shared)
    hidden = matmul_add(b, f"{scope}/ffn/fc2", hidden, FFN_HIDDEN, HIDDEN)
    z = b.add_node("Add", f"{scope}/ffn_residual", [hidden, y])
    return _layer_norm(b, f"{scope}/ffn_norm", z, output=output)


def build_transformer_encoder(seed: int = 0) -> onnx.ModelProto:
    """Two-layer BERT-like encoder, hidden 32, 4 heads of 8, FFN 64.

    ::

        mask [N,S] -> mask/invert (1 - mask) -> mask/scale (* float32 min) -> mask/unsqueeze [N,1,1,S]
        tokens [N,S,32]
          layer{1,2}:
            attn/{q,k,v}_proj: matmul -> add -> reshape [N,S,4,8] -> transpose
            attn/scores (Q @ K^T) -> attn/scale (/ sqrt 8) -> attn/add_mask -> attn/softmax
            attn/context (@ V) -> attn/merge_transpose -> attn/merge_reshape -> attn/out_proj
            attn_residual (+ layer input) -> attn_norm (LayerNormalization)
            ffn/fc1 (32->64) -> ffn/gelu (div, erf, add, mul, mul_half) -> ffn/fc2 (64->32)
            ffn_residual (+ attn_norm output) -> ffn_norm (LayerNormalization)
        hidden_states [N,S,32]

    The float32-min constant is ``mask/float32_min``; ``mask/scale_output_0`` holds it at padded
    positions.
    """
    b = GraphBuilder("transformer_encoder", seed)
    tokens = b.add_input("tokens", [BATCH_DIM, SEQUENCE_DIM, HIDDEN])
    mask = b.add_input("mask", [BATCH_DIM, SEQUENCE_DIM])
    b.add_output("hidden_states", [BATCH_DIM, SEQUENCE_DIM, HIDDEN])
    additive_mask = _additive_mask(b, mask)
    shared = _shared_constants(b)
    y = tokens
    for index in range(1, NUM_LAYERS + 1):
        output = "hidden_states" if index == NUM_LAYERS else None
        y = _encoder_layer(b, f"layer{index}", y, additive_mask, shared, output)
    return b.build(build_transformer_encoder.__doc__ or "")
