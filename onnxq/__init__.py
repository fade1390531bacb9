"""onnxq: post-training INT8 quantization of ONNX models for TensorRT."""
