"""Tests of TensorRT engine builds and runs (`onnxq.runtime.trt`, `onnxq build`)."""
