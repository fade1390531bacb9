"""YOLOv5/v8-style synthetic detector: SiLU convs, a C2f block, SPPF, an upsampling neck, two heads.

BatchNormalization is folded (every Conv has a bias) and SiLU is exported as Mul(x, Sigmoid(x)),
as the Ultralytics exporters do. See `builders_common` for the naming scheme.
"""

from __future__ import annotations

import numpy as np
import onnx

from models.builders_common import BATCH_DIM, GraphBuilder, conv, int64s, silu

__all__ = ["build_yolo_neck_head", "NUM_ANCHORS", "NUM_CLASSES"]

NUM_ANCHORS = 3
NUM_CLASSES = 2
ANCHOR_OUTPUTS = 5 + NUM_CLASSES  # box (4) + objectness (1) + class scores


def _conv_silu(
    b: GraphBuilder, scope: str, x: str, c_in: int, c_out: int, kernel: int, stride: int = 1
) -> str:
    """``{scope}/conv`` (with bias) then SiLU as ``{scope}/silu/sigmoid`` and ``{scope}/silu/mul``."""
    y = conv(b, f"{scope}/conv", x, c_in, c_out, kernel, stride=stride)
    return silu(b, f"{scope}/silu", y)


def _c2f(b: GraphBuilder, x: str, channels: int) -> str:
    """C2f/CSP block: split channels in half, bottleneck one half with a residual, concat all three."""
    half = channels // 2
    split_sizes = b.add_constant("c2f/split.sizes", int64s([half, half]))
    passthrough, branch = b.add_multi_output_node(
        "Split", "c2f/split", [x, split_sizes],
        ["c2f/split_output_0", "c2f/split_output_1"], axis=1,
    )
    y = _conv_silu(b, "c2f/bottleneck", branch, half, half, 3)
    y = b.add_node("Add", "c2f/bottleneck/add", [branch, y])
    y = b.add_node("Concat", "c2f/concat", [passthrough, branch, y], axis=1)
    return _conv_silu(b, "c2f/out", y, 3 * half, channels, 1)


def _sppf(b: GraphBuilder, x: str, channels: int) -> str:
    """SPPF: 1x1 conv, three chained 5x5 stride-1 MaxPools, concat of all four, 1x1 conv."""
    hidden = channels // 2
    y = _conv_silu(b, "sppf/in", x, channels, hidden, 1)
    pooled = [y]
    for index in range(1, 4):
        pooled.append(
            b.add_node(
                "MaxPool", f"sppf/maxpool{index}", [pooled[-1]],
                kernel_shape=[5, 5], strides=[1, 1], pads=[2] * 4,
            )
        )
    y = b.add_node("Concat", "sppf/concat", pooled, axis=1)
    return _conv_silu(b, "sppf/out", y, 4 * hidden, channels, 1)


def _neck(b: GraphBuilder, deep: str, shallow: str, c_deep: int, c_shallow: int) -> str:
    """Upsample the deep map 2x (nearest Resize via `scales`), concat the shallow map, 1x1 conv."""
    scales = b.add_constant("neck/upsample.scales", np.array([1, 1, 2, 2], dtype=np.float32))
    up = b.add_node(
        "Resize", "neck/upsample", [deep, "", scales],
        mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor",
    )
    y = b.add_node("Concat", "neck/concat", [up, shallow], axis=1)
    return _conv_silu(b, "neck/fuse", y, c_deep + c_shallow, c_shallow, 1)


def _detect_head(b: GraphBuilder, scope: str, x: str, channels: int, height: int, width: int) -> str:
    """1x1 conv to anchors*(5+nc), Reshape [N,3,5+nc,H*W], Transpose [N,3,H*W,5+nc], Sigmoid."""
    y = conv(b, f"{scope}/conv", x, channels, NUM_ANCHORS * ANCHOR_OUTPUTS, 1)
    shape = b.add_constant(
        f"{scope}/reshape.shape", int64s([0, NUM_ANCHORS, ANCHOR_OUTPUTS, height * width])
    )
    y = b.add_node("Reshape", f"{scope}/reshape", [y, shape])
    y = b.add_node("Transpose", f"{scope}/transpose", [y], perm=[0, 1, 3, 2])
    return b.add_node("Sigmoid", f"{scope}/sigmoid", [y])


def build_yolo_neck_head(seed: int = 0) -> onnx.ModelProto:
    """Small YOLO-style detector (39 compute nodes, no BatchNormalization).

    ::

        input [N,3,64,64]
          stem (Conv 3x3 s2 + SiLU)                                               [N,32,32,32]
          c2f: split -> (half, half -> bottleneck conv+SiLU -> add) -> concat -> out conv
                                                                                  [N,32,32,32] = P3
          down (Conv 3x3 s2 + SiLU)                                               [N,64,16,16]
          sppf: in conv -> maxpool1 -> maxpool2 -> maxpool3 -> concat(4) -> out conv  [N,64,16,16] = P4
          neck: upsample(P4, Resize x2) -> concat(P3) -> fuse conv                [N,32,32,32]
          detect/p3 (on neck): conv 1x1 -> reshape -> transpose -> sigmoid        [N,3,1024,7]
          detect/p4 (on P4):   conv 1x1 -> reshape -> transpose -> sigmoid        [N,3,256,7]
          detect/concat (axis 2)
        detections [N,3,1280,7]      (7 = 4 box + 1 objectness + 2 classes)
    """
    b = GraphBuilder("yolo_neck_head", seed)
    x = b.add_input("input", [BATCH_DIM, 3, 64, 64])
    b.add_output("detections", [BATCH_DIM, NUM_ANCHORS, 32 * 32 + 16 * 16, ANCHOR_OUTPUTS])
    y = _conv_silu(b, "stem", x, 3, 32, 3, stride=2)
    p3 = _c2f(b, y, 32)
    y = _conv_silu(b, "down", p3, 32, 64, 3, stride=2)
    p4 = _sppf(b, y, 64)
    fused = _neck(b, p4, p3, 64, 32)
    heads = [
        _detect_head(b, "detect/p3", fused, 32, 32, 32),
        _detect_head(b, "detect/p4", p4, 64, 16, 16),
    ]
    b.add_node("Concat", "detect/concat", heads, output="detections", axis=2)
    return b.build(build_yolo_neck_head.__doc__ or "")
