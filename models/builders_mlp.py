"""Fully connected synthetic model: Gemm in both weight layouts, then MatMul + Add."""

from __future__ import annotations

import onnx

from models.builders_common import BATCH_DIM, GraphBuilder, gemm, matmul_add, relu

__all__ = ["build_gemm_mlp"]


def build_gemm_mlp(seed: int = 0) -> onnx.ModelProto:
    """Three-layer MLP whose layers use Gemm transB=1, Gemm transB=0 and MatMul + Add.

    ::

        input [N,64]
          fc1 (Gemm transB=1, weight [128,64]) -> relu1      [N,128]
          fc2 (Gemm transB=0, weight [128,32]) -> relu2      [N,32]
          fc3/matmul (weight [32,10]) -> fc3/add (bias [10])
        logits [N,10]
    """
    b = GraphBuilder("gemm_mlp", seed)
    x = b.add_input("input", [BATCH_DIM, 64])
    b.add_output("logits", [BATCH_DIM, 10])
    y = relu(b, "relu1", gemm(b, "fc1", x, 64, 128, trans_b=1))
    y = relu(b, "relu2", gemm(b, "fc2", y, 128, 32, trans_b=0))
    matmul_add(b, "fc3", y, 32, 10, output="logits")
    return b.build(build_gemm_mlp.__doc__ or "")
