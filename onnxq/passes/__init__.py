"""Graph passes: the pass contract and the "prepare" stage that runs before quantization.

`PREPARE` turns any supported float model (after `upgrade_opset`) into the form the planner expects:
Constant nodes lowered to initializers, constant subgraphs folded, and BatchNormalization folded
into the convolutions before it, zero Pads into the Convs after them and constant Adds into Conv biases, so every weight is a `gs.Constant` feeding its Conv, ConvTranspose,
Gemm or MatMul directly; element-wise hard-sigmoid/hard-swish chains become single ops (opset 14 when
needed), one float op between Q/DQ instead of four; two-input Sums become Adds (the residual rules and
ORT's QLinearAdd know Add); MatMul weights [1, .., 1, K, N] become [K, N] (per-channel scales need 2-D);
AveragePools lose all-1 dilations (ORT's QLinearAveragePool refuses the attribute).
The order matters: `constants_to_initializers` comes first because gs's
own lowering inside `fold_constants` gives `value_float(s)` the wrong dtype (float64), and so that
Constant-node weights become initializers even when folding fails; `fuse_bn` comes last because
conv weights and BN parameters computed by constant chains are only constants once folded.
"""

from __future__ import annotations

from onnxq.passes.constants_to_initializers import constants_to_initializers
from onnxq.passes.core import GraphPass, graph_pass, run
from onnxq.passes.fold_constants import fold_constants
from onnxq.passes.fold_bias_add import fold_bias_add
from onnxq.passes.drop_unit_dilations import drop_unit_dilations
from onnxq.passes.fold_pad import fold_pad
from onnxq.passes.fuse_bn import fuse_bn
from onnxq.passes.fuse_hardswish import fuse_hardswish
from onnxq.passes.squeeze_matmul_weights import squeeze_matmul_weights
from onnxq.passes.sum_to_add import sum_to_add
from onnxq.passes.upgrade_opset import upgrade_opset

__all__ = [
    "GraphPass",
    "graph_pass",
    "run",
    "upgrade_opset",
    "constants_to_initializers",
    "fold_constants",
    "fuse_bn",
    "fold_pad",
    "fold_bias_add",
    "fuse_hardswish",
    "sum_to_add",
    "squeeze_matmul_weights",
    "drop_unit_dilations",
    "PREPARE",
]

#: The passes that prepare a float graph for quantization, in the order they must run.
PREPARE: tuple[GraphPass, ...] = (constants_to_initializers, fold_constants, fuse_bn, fold_pad, fold_bias_add,
                                  fuse_hardswish, sum_to_add, squeeze_matmul_weights, drop_unit_dilations)
