"""`onnxq compare`: a real run's table and JSON, exit codes and one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxq
from tests.support.cli import assert_one_line_error, invoke
from tests.support.paths import REPO

PPOCR = REPO / "models" / "ppocr_mobile_v2_cls.onnx"
TEXTLINES = REPO / "models" / "data" / "textlines"
EVAL = TEXTLINES / "ppocr_cls_eval.npz"
FAST = ("--warmup", "1", "--iterations", "3")


@pytest.fixture(scope="module")
def ppocr_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PP-OCR direction classifier quantized on 8 calibration lines."""
    with np.load(TEXTLINES / "ppocr_cls_calib.npz") as calib:
        feeds = [{"x": calib["x"][:8]}]
    quantized = onnxq.quantize(onnxq.load_model(PPOCR), onnxq.FeedsSource(feeds)).model
    return onnxq.save_model(quantized, tmp_path_factory.mktemp("ppocr") / "ppocr.int8.onnx")


def section(stdout: str, title: str) -> list[str]:
    """The indented table lines that follow the summary line starting with `title`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {title}"))
    table = []
    for line in lines[start + 1:]:
        if line.startswith("     "):  # the summary line's continuation
            continue
        if not line.startswith("    "):
            break
        table.append(line.split())
    return table


def test_real_run_prints_accuracy_then_latency_and_writes_json(ppocr_int8: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    outcome = invoke("compare", PPOCR, ppocr_int8, "--data", EVAL, "--batch-size", "100", *FAST, "--json", report)
    assert outcome.code == 0, outcome.stderr
    out = outcome.stdout
    assert out.startswith(f"float vs quant on 200 samples in {EVAL}\n")
    assert out.index("accuracy") < out.index("latency") < out.index("speed-up")
    assert f"float        {PPOCR}: ONNX Runtime, all graph optimizations on CPUExecutionProvider" in out
    assert f"quant        {ppocr_int8}: ONNX Runtime, all graph optimizations on CPUExecutionProvider" in out
    assert "runs interleaved float, quant, float" in out and "1 warm-up + 3 timed runs each, wall clock" in out
    header, row = section(out, "accuracy")
    assert header[-1] == "top-1" and row[:2] == ["save_infer_model/scale_0.tmp_1", "200"]
    latency = section(out, "latency")
    assert [line[0] for line in latency] == ["model", "float", "quant"]
    assert out.rstrip().endswith(f"wrote {report}")
    data = json.loads(report.read_text())
    (metrics,) = data["metrics"]
    assert f"{metrics['cosine']:.6f}" == row[2] and f"{100 * metrics['top1_agreement']:.2f}%" == row[-1]
    assert float(latency[1][1]) == pytest.approx(data["reference"]["latency"]["median_ms"], abs=0.006)
    assert len(data["candidate"]["latency"]["runs_ms"]) == 3
    assert f"speed-up     {data['speedup']:.2f}x" in out
    assert data["batch_size"] == 100 and data["timed_batch"] == 100 and data["samples"] == 200


def tiny(input_name: str = "x", output_name: str = "y", width: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", [input_name], [output_name])], "tiny",
                              [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Tiny models that disagree in one way each, and data files for them."""
    for name, model in {"a": tiny(), "renamed_input": tiny(input_name="image"), "wider": tiny(width=5),
                        "renamed_output": tiny(output_name="scores")}.items():
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
    np.savez(tmp_path / "data.npz", x=np.ones((3, 4), np.float32))
    np.savez(tmp_path / "wrong.npz", x=np.ones((3, 6), np.float32))
    return tmp_path


@pytest.mark.parametrize(("args", "fragments"), [
    ("absent.onnx a.onnx --data data.npz", ["absent.onnx: no such model file"]),
    ("a.onnx absent.onnx --data data.npz", ["absent.onnx: no such model file"]),
    ("a.onnx renamed_input.onnx --data data.npz", ["input 'x' of the float model is not an input of the quantized"]),
    ("a.onnx wider.onnx --data data.npz", ["input 'x'", "(?, 4) float32", "(?, 5) float32"]),
    ("a.onnx renamed_output.onnx --data data.npz", ["outputs differ", "'y'", "'scores'"]),
    ("a.onnx a.onnx --data wrong.npz", ["wrong.npz: input 'x' has shape (3, 6)"]),
    ("a.onnx a.onnx --data absent.npz", ["absent.npz: no such file or directory"]),
    ("a.onnx a.onnx --data data.npz --json nope/r.json", ["nope/r.json", "does not exist"]),
], ids=["missing-float", "missing-quant", "input-name", "input-shape", "output-names", "data-shape", "missing-data",
        "json-folder"])
def test_runtime_errors_exit_1_with_one_line(folder: Path, args: str, fragments: list[str]) -> None:
    before = sorted(folder.iterdir())
    argv = [str(folder / arg) if arg.endswith((".onnx", ".npz", ".json")) else arg for arg in args.split()]
    assert_one_line_error(invoke("compare", *argv), 1, *fragments)
    assert sorted(folder.iterdir()) == before


@pytest.mark.parametrize(("extra", "message"), [
    (["--iterations", "0"], "Invalid value for '--iterations'"),
    (["--warmup", "-1"], "Invalid value for '--warmup'"),
    (["--backend", "tpu"], "Invalid value for '--backend'"),
    (["--providers", "nosuchep"], "--providers: unknown execution provider 'nosuchep'"),
    (["--json", "a.onnx"], "refusing to overwrite"),
], ids=["iterations", "warmup", "backend", "provider", "json-names-input"])
def test_usage_errors_exit_2(folder: Path, extra: list[str], message: str) -> None:
    args = [str(folder / arg) if arg.endswith(".onnx") else arg for arg in extra]
    outcome = invoke("compare", folder / "a.onnx", folder / "a.onnx", "--data", folder / "data.npz", *args)
    assert outcome.code == 2 and outcome.stdout == "" and "Traceback" not in outcome.stderr
    assert len([line for line in outcome.stderr.splitlines() if message in line]) == 1, outcome.stderr


def test_missing_data_option_is_a_usage_error(folder: Path) -> None:
    outcome = invoke("compare", folder / "a.onnx", folder / "a.onnx")
    assert outcome.code == 2 and "Missing option '--data'" in outcome.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_trt_backend_without_tensorrt_exits_2_before_any_work(folder: Path) -> None:
    report = folder / "r.json"
    # The models do not even exist: the dependency is checked before anything is loaded.
    outcome = invoke("compare", folder / "absent.onnx", folder / "absent.onnx", "--data", folder / "data.npz",
                     "--backend", "trt", "--json", report)
    assert_one_line_error(outcome, 2, "--backend trt: TensorRT is not installed")
    assert not report.exists()
