"""Convolutional synthetic models: residual, depthwise, transposed, branching and Constant-node CNNs.

All take ``input`` [N, 3, 32, 32] float32; see `builders_common` for the naming scheme.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from models.builders_common import (
    BATCH_DIM,
    GraphBuilder,
    batch_norm,
    clip,
    conv,
    conv_transpose,
    flatten_gemm_head,
    relu,
    scalar,
)

__all__ = [
    "build_concat_branches",
    "build_conv_bn_constant_weights",
    "build_conv_transpose",
    "build_depthwise_cnn",
    "build_residual_cnn",
    "build_separable_relu_cnn",
]

IMAGE_SHAPE = [BATCH_DIM, 3, 32, 32]
NUM_CLASSES = 10
#: How far apart the largest and smallest per-channel weight ranges of `build_separable_relu_cnn` are.
CHANNEL_SPREAD = 100.0


def _conv_bn(
    b: GraphBuilder, scope: str, index: str, x: str, c_in: int, c_out: int, **conv_args
) -> str:
    """``{scope}/conv{index}`` (no bias, as before a BN) then ``{scope}/bn{index}``."""
    y = conv(b, f"{scope}/conv{index}", x, c_in, c_out, 3, bias=False, **conv_args)
    return batch_norm(b, f"{scope}/bn{index}", y, c_out)


def _basic_block(b: GraphBuilder, scope: str, x: str, c_in: int, c_out: int, stride: int) -> str:
    """ResNet basic block; a 1x1 Conv+BN shortcut is added when the shape changes."""
    y = _conv_bn(b, scope, "1", x, c_in, c_out, stride=stride)
    y = relu(b, f"{scope}/relu1", y)
    y = _conv_bn(b, scope, "2", y, c_out, c_out)
    skip = x
    if stride != 1 or c_in != c_out:
        skip = conv(b, f"{scope}/shortcut_conv", x, c_in, c_out, 1, stride=stride, bias=False)
        skip = batch_norm(b, f"{scope}/shortcut_bn", skip, c_out)
    total = b.add_node("Add", f"{scope}/add", [y, skip])
    return relu(b, f"{scope}/relu2", total)


def build_residual_cnn(seed: int = 0) -> onnx.ModelProto:
    """ResNet-style CNN with unfolded BatchNormalization and two residual Adds.

    ::

        input [N,3,32,32]
          stem/conv (3x3, bias) -> stem/bn -> stem/relu                         [N,16,32,32]
          block1: conv1-bn1-relu1-conv2-bn2 --+--> block1/add -> block1/relu2     [N,16,32,32]
                  (identity skip) ------------'
          block2: conv1(s2)-bn1-relu1-conv2-bn2 --+--> block2/add -> block2/relu2 [N,32,16,16]
                  shortcut_conv(1x1,s2)-shortcut_bn -'
          head/maxpool (2x2) -> head/gap -> head/flatten -> head/fc (Gemm transB=1)
        logits [N,10]

    Only the stem conv has a bias; the block convs have none (as PyTorch ResNets export them).
    """
    b = GraphBuilder("residual_cnn", seed)
    x = b.add_input("input", IMAGE_SHAPE)
    b.add_output("logits", [BATCH_DIM, NUM_CLASSES])
    y = conv(b, "stem/conv", x, 3, 16, 3)
    y = relu(b, "stem/relu", batch_norm(b, "stem/bn", y, 16))
    y = _basic_block(b, "block1", y, 16, 16, stride=1)
    y = _basic_block(b, "block2", y, 16, 32, stride=2)
    y = b.add_node("MaxPool", "head/maxpool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.add_node("GlobalAveragePool", "head/gap", [y])
    flatten_gemm_head(b, y, 32, NUM_CLASSES)
    return b.build(build_residual_cnn.__doc__ or "")


def build_depthwise_cnn(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2-style inverted residual block with ReLU6 as Clip(0, 6).

    ::

        input [N,3,32,32]
          stem/conv (3x3, s2) -> stem/relu6                                    [N,16,16,16]
          block/expand_conv (1x1) -> block/expand_relu6                        [N,64,16,16]
          block/depthwise_conv (3x3, group 64) -> block/depthwise_relu6         [N,64,16,16]
          block/project_conv (1x1, linear) --> block/add (+ stem output)       [N,16,16,16]
          head/avgpool (16x16) -> head/flatten -> head/fc (Gemm transB=1)
        logits [N,10]

    All Clips share the bound tensors ``relu6.min`` (0) and ``relu6.max`` (6).
    """
    b = GraphBuilder("depthwise_cnn", seed)
    x = b.add_input("input", IMAGE_SHAPE)
    b.add_output("logits", [BATCH_DIM, NUM_CLASSES])
    low = b.add_constant("relu6.min", scalar(0.0))
    high = b.add_constant("relu6.max", scalar(6.0))
    stem = clip(b, "stem/relu6", conv(b, "stem/conv", x, 3, 16, 3, stride=2), low, high)
    y = conv(b, "block/expand_conv", stem, 16, 64, 1)
    y = clip(b, "block/expand_relu6", y, low, high)
    y = conv(b, "block/depthwise_conv", y, 64, 64, 3, group=64)
    y = clip(b, "block/depthwise_relu6", y, low, high)
    y = conv(b, "block/project_conv", y, 64, 16, 1)
    y = b.add_node("Add", "block/add", [y, stem])
    y = b.add_node("AveragePool", "head/avgpool", [y], kernel_shape=[16, 16], strides=[16, 16])
    flatten_gemm_head(b, y, 16, NUM_CLASSES)
    return b.build(build_depthwise_cnn.__doc__ or "")


def build_conv_transpose(seed: int = 0) -> onnx.ModelProto:
    """Encoder-decoder with a plain and a grouped ConvTranspose.

    ::

        input [N,3,32,32]
          encoder/conv (3x3, s2) -> encoder/relu                               [N,16,16,16]
          decoder/deconv1 (ConvTranspose 2x2, s2, group 1, 16->8) -> decoder/relu  [N,8,32,32]
          decoder/deconv2 (ConvTranspose 3x3, s1, pad 1, group 2, 8->4)
        output [N,4,32,32]

    Weights are [C_in, C_out / group, kH, kW]: [16,8,2,2] and [8,2,3,3].
    """
    b = GraphBuilder("conv_transpose", seed)
    x = b.add_input("input", IMAGE_SHAPE)
    b.add_output("output", [BATCH_DIM, 4, 32, 32])
    y = relu(b, "encoder/relu", conv(b, "encoder/conv", x, 3, 16, 3, stride=2))
    y = conv_transpose(b, "decoder/deconv1", y, 16, 8, 2, stride=2)
    y = relu(b, "decoder/relu", y)
    conv_transpose(b, "decoder/deconv2", y, 8, 4, 3, stride=1, pad=1, group=2, output="output")
    return b.build(build_conv_transpose.__doc__ or "")


def build_conv_bn_constant_weights(seed: int = 0) -> onnx.ModelProto:
    """Opset-11 Conv/BN/Relu residual whose parameters are all Constant nodes (PP-OCR export style).

    ::

        input [N,3,32,32]
          block/conv1 -> block/bn1 -> block/relu1 ---------------------+
          block/conv2 -> block/bn2 --> block/add (+ relu1 output) <----'
          block/relu2
        output [N,16,32,32]

    There are no initializers: every weight and BN statistic comes from a node ``const/<name>``.
    """
    b = GraphBuilder("conv_bn_constant_weights", seed, opset=11, constant_nodes=True)
    x = b.add_input("input", IMAGE_SHAPE)
    b.add_output("output", [BATCH_DIM, 16, 32, 32])
    first = relu(b, "block/relu1", _conv_bn(b, "block", "1", x, 3, 16))
    y = _conv_bn(b, "block", "2", first, 16, 16)
    y = b.add_node("Add", "block/add", [y, first])
    relu(b, "block/relu2", y, output="output")
    return b.build(build_conv_bn_constant_weights.__doc__ or "")


def build_concat_branches(seed: int = 0) -> onnx.ModelProto:
    """Inception-like block: three parallel branches joined by a channel Concat.

    ::

        input [N,3,32,32]
          stem/conv (3x3) -> stem/relu                                         [N,16,32,32]
            +-> branch1x1/conv (1x1) -> branch1x1/relu                         [N,8,32,32]
            +-> branch3x3/conv (3x3) -> branch3x3/relu                         [N,8,32,32]
            +-> branch_pool/maxpool (3x3,s1,p1) -> branch_pool/conv (1x1) -> branch_pool/relu
          merge/concat (axis 1)                                                [N,24,32,32]
          merge/conv (1x1) -> merge/relu -> head/gap -> head/flatten -> head/fc (Gemm transB=1)
        logits [N,10]
    """
    b = GraphBuilder("concat_branches", seed)
    x = b.add_input("input", IMAGE_SHAPE)
    b.add_output("logits", [BATCH_DIM, NUM_CLASSES])
    stem = relu(b, "stem/relu", conv(b, "stem/conv", x, 3, 16, 3))
    branch1 = relu(b, "branch1x1/relu", conv(b, "branch1x1/conv", stem, 16, 8, 1))
    branch3 = relu(b, "branch3x3/relu", conv(b, "branch3x3/conv", stem, 16, 8, 3))
    pooled = b.add_node(
        "MaxPool", "branch_pool/maxpool", [stem], kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4
    )
    branch_pool = relu(b, "branch_pool/relu", conv(b, "branch_pool/conv", pooled, 16, 8, 1))
    y = b.add_node("Concat", "merge/concat", [branch1, branch3, branch_pool], axis=1)
    y = relu(b, "merge/relu", conv(b, "merge/conv", y, 24, 32, 1))
    y = b.add_node("GlobalAveragePool", "head/gap", [y])
    flatten_gemm_head(b, y, 32, NUM_CLASSES)
    return b.build(build_concat_branches.__doc__ or "")


def _spread_channels(b: GraphBuilder, depthwise: str, pointwise: str, channels: int) -> None:
    """Multiply the output channels (weight and bias) of the depthwise Conv by gains log-spaced over
    `CHANNEL_SPREAD`, in random order, and divide the input channels of the pointwise Conv after it by
    them: the model computes the same function (ReLU is positively homogeneous), with unbalanced channels."""
    gains = np.geomspace(1.0 / math.sqrt(CHANNEL_SPREAD), math.sqrt(CHANNEL_SPREAD), channels)
    gains = gains[b.rng.permutation(channels)]
    for name, shape in ((f"{depthwise}.weight", (-1, 1, 1, 1)), (f"{depthwise}.bias", (-1,))):
        b.set_constant(name, (b.constant(name) * gains.reshape(shape)).astype(np.float32))
    name = f"{pointwise}.weight"
    b.set_constant(name, (b.constant(name) / gains.reshape(1, -1, 1, 1)).astype(np.float32))


def build_separable_relu_cnn(seed: int = 0) -> onnx.ModelProto:
    """Two depthwise-separable blocks with ReLU whose depthwise channels are unbalanced by 100x.

    ::

        input [N,3,32,32]
          stem/conv (3x3, s2) -> stem/relu                                        [N,16,16,16]
          block1/depthwise_conv (3x3, group 16) -> block1/depthwise_relu          [N,16,16,16]
          block1/pointwise_conv (1x1) -> block1/pointwise_relu                    [N,32,16,16]
          block2/depthwise_conv (3x3, group 32) -> block2/depthwise_relu          [N,32,16,16]
          block2/pointwise_conv (1x1) -> block2/pointwise_relu                    [N,32,16,16]
          head/gap -> head/flatten -> head/fc (Gemm transB=1)
        logits [N,10]

    As after folding BatchNorm into a depthwise conv whose channels have very different variances, the
    output channels of each depthwise conv (weight and bias) are multiplied by gains spread
    log-uniformly over `CHANNEL_SPREAD` (100x), in random order, and the input channels of the pointwise
    conv after it are divided by them: the function is unchanged, but the per-channel weight ranges of
    both convs, and the channel ranges of the activation between them, differ by 100x and more. All four
    Conv -> ReLU -> Conv pairs are positively homogeneous, so cross-layer equalization can undo it exactly.
    """
    b = GraphBuilder("separable_relu_cnn", seed)
    x = b.add_input("input", IMAGE_SHAPE)
    b.add_output("logits", [BATCH_DIM, NUM_CLASSES])
    y = relu(b, "stem/relu", conv(b, "stem/conv", x, 3, 16, 3, stride=2))
    y = relu(b, "block1/depthwise_relu", conv(b, "block1/depthwise_conv", y, 16, 16, 3, group=16))
    y = relu(b, "block1/pointwise_relu", conv(b, "block1/pointwise_conv", y, 16, 32, 1))
    y = relu(b, "block2/depthwise_relu", conv(b, "block2/depthwise_conv", y, 32, 32, 3, group=32))
    y = relu(b, "block2/pointwise_relu", conv(b, "block2/pointwise_conv", y, 32, 32, 1))
    _spread_channels(b, "block1/depthwise_conv", "block1/pointwise_conv", 16)
    _spread_channels(b, "block2/depthwise_conv", "block2/pointwise_conv", 32)
    y = b.add_node("GlobalAveragePool", "head/gap", [y])
    flatten_gemm_head(b, y, 32, NUM_CLASSES)
    return b.build(build_separable_relu_cnn.__doc__ or "")
