"""Tests of TensorRT engine builds and runs (`onnxq.trt`, `onnxq build`)."""
