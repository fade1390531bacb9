"""`onnxq quantize --smoothquant`, `--report DIR` and `--quantize-attention` from the command line."""

from __future__ import annotations

import json

import numpy as np
import onnx

import models
from tests.support.cli import invoke


def _outlier_workspace(tmp_path):
    model = models.BUILDERS["outlier_encoder"]()
    onnx.save(model, str(tmp_path / "enc.onnx"))
    calib = models.random_feeds(model, batch=16, seed=1)
    held_out = models.random_feeds(model, batch=16, seed=2)
    np.savez(tmp_path / "calib.npz", **calib)
    np.savez(tmp_path / "eval.npz", **held_out)
    return tmp_path / "enc.onnx", tmp_path / "calib.npz", tmp_path / "eval.npz"


def _cosine(stdout: str) -> float:
    row = next(line for line in stdout.splitlines() if line.strip().startswith("hidden_states"))
    return float(row.split()[2])


def test_smoothquant_by_default_and_its_options_on_the_outlier_encoder(tmp_path) -> None:
    model, calib, held_out = _outlier_workspace(tmp_path)
    plain = invoke("quantize", model, "--calib", calib, "--eval", held_out, "--no-smoothquant",
                   "-o", tmp_path / "plain.onnx")
    default = invoke("quantize", model, "--calib", calib, "--eval", held_out, "-o", tmp_path / "default.onnx")
    fixed = invoke("quantize", model, "--calib", calib, "--eval", held_out, "--smoothquant", "0.5",
                   "-o", tmp_path / "fixed.onnx")
    assert plain.code == default.code == fixed.code == 0, default.stderr
    assert _cosine(plain.stdout) < 0.95 < 0.99 < min(_cosine(default.stdout), _cosine(fixed.stdout))
    assert "smoothquant  alpha measured per layer: 6 of 8" in default.stdout  # 2 attention outputs left alone
    assert "through an explicit Mul" in default.stdout and "smoothquant  alpha 0.5: 8 of 8" in fixed.stdout
    assert "  smoothquant  " not in plain.stdout
    for bad_value in ("1.5", "often"):
        bad = invoke("quantize", model, "--calib", calib, "--smoothquant", bad_value, "-o", tmp_path / "bad.onnx")
        assert bad.code == 2 and "--smoothquant" in bad.stderr and not (tmp_path / "bad.onnx").exists()
    both = invoke("quantize", model, "--calib", calib, "--smoothquant", "--no-smoothquant", "-o", tmp_path / "b.onnx")
    assert both.code == 2 and "not both" in both.stderr


def test_report_folder_holds_json_and_markdown(tmp_path) -> None:
    model, calib, held_out = _outlier_workspace(tmp_path)
    outcome = invoke("quantize", model, "--calib", calib, "--eval", held_out, "--method", "entropy",
                     "--min-cosine", "0.9", "--report", tmp_path / "report" / "run1", "-o", tmp_path / "q.onnx")
    assert outcome.code == 0, outcome.stderr
    report = json.loads((tmp_path / "report" / "run1" / "report.json").read_text())
    names = {d["node_name"] for d in report["decisions"]}
    assert {n.name for n in onnx.load(str(model)).graph.node} <= names | {""}
    markdown = (tmp_path / "report" / "run1" / "report.md").read_text()
    assert "sensitivity" in markdown.lower() and "before_fallback" in markdown


def test_quantize_attention_flag_changes_the_plan(tmp_path) -> None:
    model = models.BUILDERS["transformer_encoder"]()
    onnx.save(model, str(tmp_path / "tr.onnx"))
    default = invoke("inspect", tmp_path / "tr.onnx")
    asked = invoke("inspect", tmp_path / "tr.onnx", "--quantize-attention")
    row = lambda out: next(line for line in out.splitlines() if line.startswith("layer1/attn/scores "))  # noqa: E731
    assert " no " in row(default.stdout) and "Softmax" in row(default.stdout)
    assert " yes " in row(asked.stdout)
    ort_cpu = invoke("inspect", tmp_path / "tr.onnx", "--target", "ort-cpu")
    ort_cpu_float = invoke("inspect", tmp_path / "tr.onnx", "--target", "ort-cpu", "--no-quantize-attention")
    assert " yes " in row(ort_cpu.stdout)  # ORT's CPU provider: quantized by default
    assert " no " in row(ort_cpu_float.stdout)
