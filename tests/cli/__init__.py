"""Tests of the `onnxq` command line."""
