"""onnxq: post-training INT8 quantization of ONNX models for TensorRT."""
__version__ = "0.1.0"
