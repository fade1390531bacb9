"""Pre-LN transformer encoder whose LayerNorm outputs carry a few outlier channels, for SmoothQuant.

Large language models and BERT show a handful of hidden channels whose LayerNorm output is one to two
orders of magnitude larger than the rest, in every token (Dettmers et al., "LLM.int8()", 2022; Xiao et
al., "SmoothQuant", ICML 2023). With per-tensor INT8 activations, the scale is set by those
channels and the others round to a few levels: this model reproduces that. The LayerNorms that feed
the attention and FFN projections have `OUTLIER_CHANNELS` whose gamma and beta are `OUTLIER_GAIN` (50
to 100) times larger than usual; the rows of the projection weights that read those channels are
smaller by the square root of the gain, so the outlier channels matter to the result without drowning
the others (as in trained models, which learn to use them). In each FFN, four hidden channels of the
GELU output are 20 to 50 times larger than the rest (fc1's column and a positive bias scaled up, fc2's
row scaled down): outliers that only an explicit per-channel scale before fc2 can smooth.

Layout (pre-LN, as GPT/OPT/LLaMA): ``x + attn(LN(x))`` then ``x + ffn(LN(x))``, a final LayerNorm
without outliers writes the output. Linear layers are MatMul by [in, out] plus Add, the attention mask
is the float32-min fill of `builders_transformer`, GELU is the exact Erf form. Names follow
`models.builders_common`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from models.builders_common import BATCH_DIM, GraphBuilder, int64s, scalar

__all__ = ["build_outlier_encoder", "HIDDEN", "OUTLIER_CHANNELS", "OUTLIER_GAIN", "FFN_OUTLIER_CHANNELS",
           "FFN_OUTLIER_GAIN"]

SEQUENCE_DIM = "S"
HIDDEN = 64
NUM_HEADS = 4
HEAD_SIZE = HIDDEN // NUM_HEADS
FFN_HIDDEN = 128
NUM_LAYERS = 2
#: The hidden channels whose LayerNorm gamma and beta are scaled up (3 of 64).
OUTLIER_CHANNELS = (5, 27, 49)
#: The range the outlier gain of each such channel is drawn from.
OUTLIER_GAIN = (50.0, 100.0)
#: The FFN hidden channels (of 128) whose fc1 column is scaled up, so GELU writes outliers there.
FFN_OUTLIER_CHANNELS = (7, 40, 77, 101)
#: The range the gain of each such FFN channel is drawn from.
FFN_OUTLIER_GAIN = (20.0, 50.0)
FLOAT32_MIN = float(np.finfo(np.float32).min)


def _outlier_gain(b: GraphBuilder) -> np.ndarray:
    """Per hidden channel: 1, or a gain drawn from `OUTLIER_GAIN` on the outlier channels."""
    gain = np.ones(HIDDEN)
    gain[list(OUTLIER_CHANNELS)] = b.rng.uniform(*OUTLIER_GAIN, len(OUTLIER_CHANNELS))
    return gain


def _layer_norm(b: GraphBuilder, name: str, x: str, gain: np.ndarray, output: str | None = None) -> str:
    """LayerNormalization over the hidden axis; gamma and beta multiplied by `gain`."""
    gamma = ((1.0 + b.rng.normal(0.0, 0.1, HIDDEN)) * gain).astype(np.float32)
    beta = (b.small_bias(HIDDEN) * gain).astype(np.float32)
    inputs = [x, b.add_constant(f"{name}.scale", gamma), b.add_constant(f"{name}.bias", beta)]
    return b.add_node("LayerNormalization", name, inputs, output=output, axis=-1, epsilon=1e-5)


def _linear(b: GraphBuilder, scope: str, x: str, fan_in: int, fan_out: int,
            row_gain: np.ndarray | None = None, column_gain: np.ndarray | None = None) -> str:
    """``{scope}/matmul`` by a Xavier [in, out] weight (rows divided by sqrt(row_gain); columns with a
    column_gain above 1 multiplied by it, their bias made positive and multiplied too), ``{scope}/add``."""
    weight = b.xavier_normal((fan_in, fan_out), fan_in, fan_out)
    bias = b.small_bias(fan_out)
    if row_gain is not None:
        weight = (weight / np.sqrt(row_gain)[:, None]).astype(np.float32)
    if column_gain is not None:
        weight = (weight * column_gain[None, :]).astype(np.float32)
        bias = np.where(column_gain > 1, (np.abs(bias) + 1.0) * column_gain, bias).astype(np.float32)
    product = b.add_node("MatMul", f"{scope}/matmul", [x, b.add_constant(f"{scope}.weight", weight)])
    return b.add_node("Add", f"{scope}/add", [product, b.add_constant(f"{scope}.bias", bias)])


def _additive_mask(b: GraphBuilder, mask: str) -> str:
    """(1 - mask) * float32_min, unsqueezed to [N,1,1,S]: 0 where kept, float32 min where padded."""
    inverted = b.add_node("Sub", "mask/invert", [b.add_constant("mask/one", scalar(1.0)), mask])
    scaled = b.add_node("Mul", "mask/scale", [inverted, b.add_constant("mask/float32_min", scalar(FLOAT32_MIN))])
    return b.add_node("Unsqueeze", "mask/unsqueeze", [scaled, b.add_constant("mask/unsqueeze.axes", int64s([1, 2]))])


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


def _heads(b: GraphBuilder, scope: str, x: str, gain: np.ndarray, shared: dict[str, str], perm: list[int]) -> str:
    """Project [N,S,64], reshape to [N,S,4,16], transpose by `perm`."""
    y = _linear(b, scope, x, HIDDEN, HIDDEN, gain)
    y = b.add_node("Reshape", f"{scope}/reshape", [y, shared["split_heads"]])
    return b.add_node("Transpose", f"{scope}/transpose", [y], perm=perm)


def _attention(b: GraphBuilder, scope: str, x: str, gain: np.ndarray, mask: str, shared: dict[str, str]) -> str:
    """Multi-head self-attention on the normalised `x`; returns the output projection [N,S,64]."""
    query = _heads(b, f"{scope}/q_proj", x, gain, shared, [0, 2, 1, 3])
    key_t = _heads(b, f"{scope}/k_proj", x, gain, shared, [0, 2, 3, 1])
    value = _heads(b, f"{scope}/v_proj", x, gain, shared, [0, 2, 1, 3])
    scores = b.add_node("MatMul", f"{scope}/scores", [query, key_t])
    scores = b.add_node("Div", f"{scope}/scale", [scores, shared["scale"]])
    scores = b.add_node("Add", f"{scope}/add_mask", [scores, mask])
    probs = b.add_node("Softmax", f"{scope}/softmax", [scores], axis=-1)
    context = b.add_node("MatMul", f"{scope}/context", [probs, value])
    context = b.add_node("Transpose", f"{scope}/merge_transpose", [context], perm=[0, 2, 1, 3])
    context = b.add_node("Reshape", f"{scope}/merge_reshape", [context, shared["merge_heads"]])
    return _linear(b, f"{scope}/out_proj", context, HIDDEN, HIDDEN)


def _ffn(b: GraphBuilder, scope: str, x: str, gain: np.ndarray, shared: dict[str, str]) -> str:
    """fc1 (64->128), exact GELU x * (erf(x / sqrt2) + 1) * 0.5, fc2 (128->64); the FFN outlier channels
    have their fc1 column and bias (made positive, so GELU passes them) multiplied by their gain and
    their fc2 row divided by it."""
    ffn_gain = np.ones(FFN_HIDDEN)
    ffn_gain[list(FFN_OUTLIER_CHANNELS)] = b.rng.uniform(*FFN_OUTLIER_GAIN, len(FFN_OUTLIER_CHANNELS))
    hidden = _linear(b, f"{scope}/fc1", x, HIDDEN, FFN_HIDDEN, gain, column_gain=ffn_gain)
    y = b.add_node("Div", f"{scope}/gelu/div", [hidden, shared["sqrt2"]])
    y = b.add_node("Erf", f"{scope}/gelu/erf", [y])
    y = b.add_node("Add", f"{scope}/gelu/add", [y, shared["one"]])
    y = b.add_node("Mul", f"{scope}/gelu/mul", [hidden, y])
    y = b.add_node("Mul", f"{scope}/gelu/mul_half", [y, shared["half"]])
    return _linear(b, f"{scope}/fc2", y, FFN_HIDDEN, HIDDEN, row_gain=ffn_gain**2)


def _encoder_layer(b: GraphBuilder, scope: str, x: str, mask: str, shared: dict[str, str]) -> str:
    """Pre-LN layer: x + attn(attn_norm(x)), then + ffn(ffn_norm(.)); both norms have outliers."""
    gain = _outlier_gain(b)
    normed = _layer_norm(b, f"{scope}/attn_norm", x, gain)
    attended = _attention(b, f"{scope}/attn", normed, gain, mask, shared)
    x = b.add_node("Add", f"{scope}/attn_residual", [x, attended])
    gain = _outlier_gain(b)
    normed = _layer_norm(b, f"{scope}/ffn_norm", x, gain)
    return b.add_node("Add", f"{scope}/ffn_residual", [x, _ffn(b, f"{scope}/ffn", normed, gain, shared)])


def build_outlier_encoder(seed: int = 0) -> onnx.ModelProto:
    """Two-layer pre-LN encoder, hidden 64, 4 heads of 16, FFN 128, LayerNorm outputs with 3 outlier channels.

    ::

        mask [N,S] -> mask/invert (1 - mask) -> mask/scale (* float32 min) -> mask/unsqueeze [N,1,1,S]
        tokens [N,S,64]
          layer{1,2}:
            attn_norm (LayerNormalization, channels 5, 27, 49: gamma and beta x50..100)
            attn/{q,k,v}_proj: matmul -> add -> reshape [N,S,4,16] -> transpose
            attn/scores -> attn/scale (/ 4) -> attn/add_mask -> attn/softmax -> attn/context
            attn/merge_transpose -> attn/merge_reshape -> attn/out_proj
            attn_residual (layer input + out_proj)
            ffn_norm (LayerNormalization, outliers as attn_norm)
            ffn/fc1 (64->128) -> ffn/gelu (div, erf, add, mul, mul_half) -> ffn/fc2 (128->64)
            ffn_residual (attn_residual + fc2)
        final_norm (LayerNormalization, no outliers) -> hidden_states [N,S,64]

    The weight rows of q/k/v_proj and fc1 that read an outlier channel are divided by the square
    root of its gain. FFN outliers: fc1 columns 7, 40, 77, 101 (weight and a positive bias) are
    multiplied by a gain of 20 to 50, so the GELU output (fc2's input, which no producer can rescale)
    carries them; fc2's rows for those channels are divided by the gain.
    """
    b = GraphBuilder("outlier_encoder", seed)
    tokens = b.add_input("tokens", [BATCH_DIM, SEQUENCE_DIM, HIDDEN])
    mask = b.add_input("mask", [BATCH_DIM, SEQUENCE_DIM])
    b.add_output("hidden_states", [BATCH_DIM, SEQUENCE_DIM, HIDDEN])
    additive_mask = _additive_mask(b, mask)
    shared = _shared_constants(b)
    y = tokens
    for index in range(1, NUM_LAYERS + 1):
        y = _encoder_layer(b, f"layer{index}", y, additive_mask, shared)
    _layer_norm(b, "final_norm", y, np.ones(HIDDEN), output="hidden_states")
    return b.build(build_outlier_encoder.__doc__ or "")
