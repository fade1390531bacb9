"""Random layers with weights or windows: Conv (plain, depthwise, grouped), ConvTranspose, MatMul, Gemm, the
pools, Resize, the normalisations and Softmax. Each `emit_*` adds one node (and its constants) reading `x`
and returns True, or returns False having added nothing when the draw does not fit `x`."""

from __future__ import annotations

import math

import numpy as np

from tests.fuzz.builder import Builder, Shape, Tensor, choice

__all__ = ["LAYER_OPS"]


def _image(x: Tensor) -> bool:
    return x.rank == 4 and x.static(1)


def _windowed(size: int, kernel: int, stride: int, pads: tuple[int, int], dilation: int, ceil: bool = False) -> int:
    """Output size of a Conv/pool window along one axis (ONNX operator docs, MaxPool/Conv output shape)."""
    span = size + pads[0] + pads[1] - dilation * (kernel - 1) - 1
    out = (math.ceil(span / stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pads[0]:
        return 0  # the last window would start in the end padding: runtimes and shape inference differ here
    return out


def _spatial(x: Tensor, size) -> tuple[Shape, Shape]:
    return tuple((s[0], s[1], size(s[2]), size(s[3])) for s in x.shapes)


def _pads(b: Builder, limit: int) -> list[int]:
    return [b.draw.integer(0, limit) for _ in range(4)] if b.draw.chance(0.6) else [0, 0, 0, 0]


def emit_conv(b: Builder, x: Tensor) -> bool:
    cin = x.dim(1)
    kind = choice(b.draw, ["plain", "depthwise", "grouped"])
    divisors = [g for g in range(2, cin) if cin % g == 0]
    if kind == "depthwise":
        group, cout = cin, cin * choice(b.draw, [1, 2])
    elif kind == "grouped" and divisors:
        group = choice(b.draw, divisors)
        cout = group * b.draw.integer(1, 3)
    else:
        kind, group, cout = "plain", 1, b.draw.integer(2, 12)
    kernel, stride = choice(b.draw, [1, 3, 2, 5]), choice(b.draw, [1, 2])
    dilation = 2 if kernel > 1 and b.draw.chance(0.15) else 1
    pads = _pads(b, dilation * (kernel - 1))
    shapes = tuple((s[0], cout, _windowed(s[2], kernel, stride, (pads[0], pads[2]), dilation),
                    _windowed(s[3], kernel, stride, (pads[1], pads[3]), dilation)) for s in x.shapes)
    if not b.fits(*shapes):
        return False
    weight = b.weight((cout, cin // group, kernel, kernel), cin // group * kernel * kernel)
    inputs = [x.name, weight] + ([b.values((cout,), -0.2, 0.2, "bias")] if b.draw.chance(0.7) else [])
    (y,) = b.node("Conv", inputs, kernel_shape=[kernel, kernel], strides=[stride, stride], pads=pads,
                  dilations=[dilation, dilation], group=group)
    b.features.add(f"conv_{kind}")
    b.add(y, shapes)
    return True


def emit_conv_transpose(b: Builder, x: Tensor) -> bool:
    cin = x.dim(1)
    group = cin if cin > 1 and b.draw.chance(0.2) else 1
    per_group = b.draw.integer(1, 6 if group == 1 else 2)
    kernel, stride = choice(b.draw, [2, 3, 1, 4]), choice(b.draw, [2, 1])
    out_pad = b.draw.integer(0, stride - 1)
    pads = _pads(b, kernel - 1)

    def size(h: int, begin: int, end: int) -> int:
        return stride * (h - 1) + out_pad + kernel - begin - end  # ConvTranspose output shape, dilation 1

    shapes = tuple((s[0], per_group * group, size(s[2], pads[0], pads[2]), size(s[3], pads[1], pads[3]))
                   for s in x.shapes)
    if not b.fits(*shapes):
        return False
    weight = b.weight((cin, per_group, kernel, kernel), cin // group * kernel * kernel)
    inputs = [x.name, weight] + ([b.values((per_group * group,), -0.2, 0.2, "bias")] if b.draw.chance(0.5) else [])
    attrs = {"output_padding": [out_pad, out_pad]} if out_pad else {}
    (y,) = b.node("ConvTranspose", inputs, kernel_shape=[kernel, kernel], strides=[stride, stride], pads=pads,
                  group=group, **attrs)
    b.add(y, shapes)
    return True


def emit_matmul(b: Builder, x: Tensor) -> bool:
    k = x.dim(-1)
    mode = choice(b.draw, ["weight", "weight", "activations", "weight_rank3"])
    if mode == "activations" and x.rank >= 3 and x.static(-2):
        perm = [*range(x.rank - 2), x.rank - 1, x.rank - 2]
        shapes = tuple((*s[:-1], s[-2]) for s in x.shapes)
        if not b.fits(*shapes):
            return False
        (xt,) = b.node("Transpose", [x.name], perm=perm)
        (y,) = b.node("MatMul", [x.name, xt])
        b.features.add("matmul_activations")
        b.add(y, shapes)
        return True
    earlier = [shape[1] for shape in b.weights_by_shape if len(shape) == 2 and shape[0] == k]
    m = choice(b.draw, earlier) if earlier and b.draw.chance(0.5) else b.draw.integer(2, 24)  # sharing then likely
    shapes = tuple((*s[:-1], m) for s in x.shapes)
    if not b.fits(*shapes):
        return False
    if mode == "weight_rank3" and x.rank >= 3:  # a broadcast [1, K, M] weight
        weight = b.weight((1, k, m), k, shareable=False)
        b.features.add("matmul_weight_rank3")
    else:
        weight = b.weight((k, m), k)
    (y,) = b.node("MatMul", [x.name, weight])
    b.add(y, shapes)
    return True


def emit_gemm(b: Builder, x: Tensor) -> bool:
    k = x.dim(1)
    trans_b = b.draw.integer(0, 1)
    tied = [shape for shape in b.weights_by_shape if len(shape) == 2 and shape[1 if trans_b else 0] == k]
    if tied and b.draw.chance(0.5):
        shape = choice(b.draw, tied)
        weight, m = choice(b.draw, b.weights_by_shape[shape]), shape[0 if trans_b else 1]
        b.features.add("tied_weight")
    else:
        m = b.draw.integer(2, 24)
        weight = b.weight((m, k) if trans_b else (k, m), k)
    shapes = tuple((s[0], m) for s in x.shapes)
    attrs = {"transB": trans_b} if trans_b or b.draw.chance(0.5) else {}
    if b.draw.chance(0.2):
        attrs["alpha"] = float(choice(b.draw, [0.5, 2.0]))
    inputs = [x.name, weight]
    if b.draw.chance(0.7):
        inputs.append(b.values(choice(b.draw, [(m,), (1, m)]), -0.2, 0.2, "bias"))
        if b.draw.chance(0.2):
            attrs["beta"] = 0.5
    (y,) = b.node("Gemm", inputs, **attrs)
    b.features.add(f"gemm_transB{trans_b}")
    b.add(y, shapes)
    return True


def emit_tied_gemms(b: Builder, x: Tensor) -> bool:
    """x [N, K] -> Gemm(W [K, M]) -> Relu -> Gemm(W, transB=1) -> [N, K]: one weight, both orientations."""
    k, m = x.dim(1), b.draw.integer(2, 24)
    weight = b.weight((k, m), k, shareable=False)
    (hidden,) = b.node("Gemm", [x.name, weight])
    (relu,) = b.node("Relu", [hidden])
    (y,) = b.node("Gemm", [relu, weight], transB=1)
    b.features.update({"tied_weight", "gemm_transB0", "gemm_transB1"})
    b.add(y, x.shapes)
    return True


def emit_shared_convs(b: Builder, x: Tensor) -> bool:
    """Conv(Conv(x, W), W) with one [C, C, 3, 3] weight, 'same' padding: a weight two layers share."""
    c = x.dim(1)
    weight = b.weight((c, c, 3, 3), c * 9, shareable=False)
    (first,) = b.node("Conv", [x.name, weight], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    (y,) = b.node("Conv", [first, weight], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.features.update({"shared_weight", "conv_plain"})
    b.add(y, x.shapes)
    return True


def _emit_pool(b: Builder, x: Tensor, op: str) -> bool:
    kernel, stride = choice(b.draw, [2, 3]), choice(b.draw, [2, 1])
    dilated = b.opset >= (19 if op == "AveragePool" else 10) and b.draw.chance(0.3)
    dilation = 2 if dilated else 1
    pads = _pads(b, kernel - 1)
    ceil = b.draw.chance(0.2)
    shapes = tuple((s[0], s[1], _windowed(s[2], kernel, stride, (pads[0], pads[2]), dilation, ceil),
                    _windowed(s[3], kernel, stride, (pads[1], pads[3]), dilation, ceil)) for s in x.shapes)
    if not b.fits(*shapes):
        return False
    attrs = {"dilations": [2, 2]} if dilated else {}
    if op == "AveragePool" and b.draw.chance(0.5):
        attrs["count_include_pad"] = 1
    (y,) = b.node(op, [x.name], kernel_shape=[kernel, kernel], strides=[stride, stride], pads=pads,
                  ceil_mode=int(ceil), **attrs)
    if dilated:
        b.features.add(f"{op.lower()}_dilated")
    b.add(y, shapes)
    return True


def emit_global_average_pool(b: Builder, x: Tensor) -> bool:
    (y,) = b.node("GlobalAveragePool", [x.name])
    b.add(y, _spatial(x, lambda _: 1))
    return True


def emit_resize(b: Builder, x: Tensor) -> bool:
    mode = choice(b.draw, ["nearest", "linear", "nearest", "cubic"])
    transform = choice(b.draw, ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
    with_axes = b.opset >= 18 and b.draw.chance(0.3)
    by_sizes = with_axes and x.static(2) and x.static(3) and b.draw.chance(0.5)
    scale = choice(b.draw, [2.0, 0.5, 1.5])
    if by_sizes:
        sizes = [max(1, int(x.dim(2) * scale)), max(1, int(x.dim(3) * scale))]
        shapes = tuple((s[0], s[1], *sizes) for s in x.shapes)
    else:
        shapes = _spatial(x, lambda h: int(math.floor(h * scale)))
    if not b.fits(*shapes):
        return False
    attrs = {"mode": mode, "coordinate_transformation_mode": transform}
    if mode == "nearest":
        attrs["nearest_mode"] = choice(b.draw, ["round_prefer_floor", "floor"])
    if with_axes:
        attrs["axes"] = [2, 3]
        b.features.add("resize_axes")
    roi = b.constant(np.zeros((0,), np.float32), "roi", as_node_p=0.0) if b.opset < 13 else ""
    scales = (np.full(2, scale) if with_axes else np.array([1.0, 1.0, scale, scale])).astype(np.float32)
    if by_sizes:
        inputs = [x.name, roi, "", b.ints(sizes, "sizes")]
    else:
        inputs = [x.name, roi, b.constant(scales, "scales", as_node_p=0.2)]
    (y,) = b.node("Resize", inputs, **attrs)
    b.features.add(f"resize_{mode}")
    b.add(y, shapes)
    return True


def emit_batch_norm(b: Builder, x: Tensor) -> bool:
    c = x.dim(1)
    inputs = [x.name, b.values((c,), 0.5, 1.5, "bn_scale"), b.values((c,), -0.3, 0.3, "bn_bias"),
              b.values((c,), -0.3, 0.3, "bn_mean"), b.values((c,), 0.5, 2.0, "bn_var")]
    (y,) = b.node("BatchNormalization", inputs, epsilon=1e-5)
    b.add(y, x.shapes)
    return True


def emit_layer_norm(b: Builder, x: Tensor) -> bool:
    d = x.dim(-1)
    inputs = [x.name, b.values((d,), 0.5, 1.5, "ln_scale")]
    if b.draw.chance(0.7):
        inputs.append(b.values((d,), -0.3, 0.3, "ln_bias"))
    (y,) = b.node("LayerNormalization", inputs, axis=-1, epsilon=1e-5)
    b.add(y, x.shapes)
    return True


def emit_softmax(b: Builder, x: Tensor) -> bool:
    axis = choice(b.draw, [-1, 1])
    (y,) = b.node("Softmax", [x.name], axis=axis)
    b.add(y, x.shapes)
    return True


# (op type, lowest opset, which tensors it reads, emitter)
LAYER_OPS = [
    ("Conv", 11, _image, emit_conv),
    ("Conv", 11, _image, emit_conv),  # twice: the layer most models have
    ("MatMul", 11, lambda x: x.rank >= 2 and x.static(-1), emit_matmul),
    ("Gemm", 11, lambda x: x.rank == 2 and x.static(1), emit_gemm),
    ("ConvTranspose", 11, _image, emit_conv_transpose),
    ("MaxPool", 11, lambda x: x.rank == 4, lambda b, x: _emit_pool(b, x, "MaxPool")),
    ("AveragePool", 11, lambda x: x.rank == 4, lambda b, x: _emit_pool(b, x, "AveragePool")),
    ("GlobalAveragePool", 11, lambda x: x.rank == 4 and x.static(1), emit_global_average_pool),
    ("Resize", 11, lambda x: x.rank == 4, emit_resize),
    ("BatchNormalization", 11, lambda x: 2 <= x.rank <= 4 and x.static(1), emit_batch_norm),
    ("Gemm", 11, lambda x: x.rank == 2 and x.static(1), emit_tied_gemms),
    ("Conv", 11, _image, emit_shared_convs),
    ("LayerNormalization", 17, lambda x: x.rank >= 2 and x.static(-1), emit_layer_norm),
    ("Softmax", 11, lambda x: x.rank >= 2, emit_softmax),
]
