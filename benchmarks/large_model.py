"""Quantize a float model over 2 GB (weights in external data) with `onnxq quantize`, and measure it.

Generates a wide MLP (MatMul + Add + Relu layers of WIDTH x WIDTH float32 weights, `--params` weights in
all, 560 M by default: 2.1 GiB) written straight to `big.onnx` + `big.onnx.data`, a few random
calibration samples, then runs the CLI in a subprocess with `-vv` and reports:

- wall time per stage, from the child's log lines, each stamped when it arrives, with the child's RSS then;
- the child's peak RSS (`getrusage(RUSAGE_CHILDREN)`, and VmHWM polled from /proc) against the model's
  size; the target is at most ~1.5x;
- the output: where its weights went (beside it, referred to by a bare file name), and, unless
  `--no-check`, the INT8 model run with ONNX Runtime from its path against the float model on the samples.

Everything is written to a temporary folder (`--workdir` to choose its parent; it needs ~1.5x the model's
size free on disk) and removed afterwards unless `--keep`. `--large-model-bytes N` sets ONNXQ_LARGE_MODEL_BYTES for
the child, so a small model (`--params 20e6`) takes the same path as a > 2 GB one, for a quick try.

    .venv/bin/python benchmarks/large_model.py                       # ~2.1 GiB model; about a minute
    .venv/bin/python benchmarks/large_model.py --params 20e6 --large-model-bytes 1000000

Measured (2 shared cores, the default 2.06 GiB model; the weights stay in the input's file, memory-mapped):
the CLI takes 24 s and peaks at 2.18 GiB RSS (VmHWM), 1.06x the model (before: 25-39 s, 4.75 GiB, 2.3x).
RSS = RssAnon (the process's own memory) + RssFile (mapped file pages): the peak is reached twice, in
calibration (0.06 + 2.11 GiB: ORT runs on the mapped weights) and when ORT checks the INT8 model
(2.14 + 0.04 GiB: the 0.52 GiB model, its serialized bytes and ORT's copy).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

GIB = 1024**3
MIB = 1024**2
_ALIGN = 64 * 1024


def write_mlp(folder: Path, params: float, width: int, seed: int = 0) -> tuple[Path, int]:
    """A MatMul/Add/Relu MLP with its weights streamed to `big.onnx.data`; returns the path and weight bytes."""
    layers = max(1, round(params / (width * width)))
    rng = np.random.default_rng(seed)
    model_path, data_name = folder / "big.onnx", "big.onnx.data"
    initializers, nodes, offset = [], [], 0
    with open(folder / data_name, "wb") as data:
        for index in range(layers):
            for name, shape in ((f"w{index}", (width, width)), (f"b{index}", (width,))):
                values = rng.standard_normal(shape, dtype=np.float32)
                values *= np.float32(1.0 / np.sqrt(width)) if name[0] == "w" else np.float32(0.1)
                offset += -offset % _ALIGN
                data.seek(offset)
                data.write(values.tobytes())
                tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", offset), ("length", values.nbytes)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
                initializers.append(tensor)
                offset += values.nbytes
            source = "x" if index == 0 else f"h{index - 1}"
            last = index == layers - 1
            nodes += [helper.make_node("MatMul", [source, f"w{index}"], [f"m{index}"], name=f"matmul{index}"),
                      helper.make_node("Add", [f"m{index}", f"b{index}"], ["y" if last else f"a{index}"],
                                       name=f"add{index}")]
            if not last:
                nodes.append(helper.make_node("Relu", [f"a{index}"], [f"h{index}"], name=f"relu{index}"))
    graph = helper.make_graph(nodes, "wide_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save_model(model, os.fspath(model_path))
    return model_path, sum(int(np.prod(t.dims)) * 4 for t in initializers)


def _vm_field(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


Memory = tuple[int, int, int]  # VmRSS, RssAnon (the process's own memory), RssFile (mapped file pages)


def _memory(pid: int) -> Memory:
    return _vm_field(pid, "VmRSS"), _vm_field(pid, "RssAnon"), _vm_field(pid, "RssFile")


def run_cli(argv: list[str], env: dict[str, str], rss_cap: int
            ) -> tuple[int, float, int, int, Memory, list[tuple[float, Memory, str]], str]:
    """Run the CLI (killed above `rss_cap` bytes); return exit code, seconds, peak RSS (rusage), polled
    VmHWM, the polled peaks of RSS, RssAnon and RssFile, onnxq's log lines stamped on arrival with the
    memory then, and stdout."""
    started = time.monotonic()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    now: list[Memory] = [(0, 0, 0)]
    lines: list[tuple[float, Memory, str]] = [(0.0, (0, 0, 0), "(started)")]

    def read_stderr() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            if "onnxruntime" in line:  # -vv also makes ORT verbose; keep onnxq's own lines
                continue
            lines.append((time.monotonic() - started, now[0], line.rstrip()))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    hwm, peaks = 0, (0, 0, 0)
    while child.poll() is None:
        now[0] = _memory(child.pid)
        peaks = tuple(max(a, b) for a, b in zip(peaks, now[0]))  # type: ignore[assignment]
        hwm = max(hwm, _vm_field(child.pid, "VmHWM"))
        if now[0][0] > rss_cap:
            child.kill()
            lines.append((time.monotonic() - started, now[0], f"(killed above {rss_cap / GIB:g} GiB)"))
        time.sleep(0.05)
    out = child.stdout.read() if child.stdout is not None else ""
    reader.join()
    seconds = time.monotonic() - started
    lines.append((seconds, now[0], "(exited)"))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return child.returncode, seconds, peak, hwm, peaks, lines, out


def check_output(output: Path, model_path: Path, samples: np.ndarray) -> str:
    """Where the output's weights are, and how close its outputs are to the float model's (ORT, from paths)."""
    import onnxruntime

    light = onnx.load(os.fspath(output), load_external_data=False)
    locations = {e.value for t in light.graph.initializer for e in t.external_data if e.key == "location"}
    files = sorted(p.name for p in output.parent.iterdir() if p.name.startswith(output.name))
    where = (f"weights in {', '.join(sorted(locations))} (bare names: {all('/' not in loc for loc in locations)})"
             if locations else "weights inline")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"x": samples[:2]}
    reference = onnxruntime.InferenceSession(os.fspath(model_path), options).run(None, feed)[0]
    quantized = onnxruntime.InferenceSession(os.fspath(output), options).run(None, feed)[0]
    cosine = float(np.sum(reference * quantized) / (np.linalg.norm(reference) * np.linalg.norm(quantized)))
    return f"files {files}; {where}; cosine to float on 2 samples {cosine:.5f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=560e6, help="float32 weights in all (default 560e6)")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=4, help="random calibration samples")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--no-check", action="store_true", help="skip running the output with ONNX Runtime")
    parser.add_argument("--rss-cap-gib", type=float, default=14.0, help="kill the child above this RSS")
    parser.add_argument("--large-model-bytes", type=int, default=None, help="ONNXQ_LARGE_MODEL_BYTES for the child")
    parser.add_argument("cli_args", nargs="*", help="more `onnxq quantize` options (after --)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="onnxq-large-", dir=args.workdir))
    try:
        began = time.monotonic()
        model_path, weight_bytes = write_mlp(folder, args.params, args.width)
        generated = time.monotonic() - began
        samples = np.random.default_rng(1).standard_normal((args.samples, args.width), dtype=np.float32)
        np.savez(folder / "calib.npz", x=samples)
        size = model_path.stat().st_size + (folder / "big.onnx.data").stat().st_size
        print(f"model: {weight_bytes / 1e6:.0f} M weight bytes, files {size / GIB:.2f} GiB "
              f"({size / MIB:.0f} MiB), generated in {generated:.1f} s")
        env = dict(os.environ)
        if args.large_model_bytes is not None:
            env["ONNXQ_LARGE_MODEL_BYTES"] = str(args.large_model_bytes)
        output = folder / "big.int8.onnx"
        argv = [sys.executable, "-m", "onnxq_cli", "-vv", "quantize", os.fspath(model_path),
                "--calib", os.fspath(folder / "calib.npz"), "-o", os.fspath(output), *args.cli_args]
        print("running:", " ".join(argv[1:]))
        code, seconds, peak, hwm, peaks, lines, out = run_cli(argv, env, int(args.rss_cap_gib * GIB))
        print("\nstages (time at each log line's arrival, the child's RSS then: all = anonymous + mapped file pages):")
        previous = 0.0
        for stamp, (rss, anon, mapped), line in lines:
            print(f"  {stamp:7.1f} s (+{stamp - previous:6.1f})  RSS {rss / GIB:5.2f} = {anon / GIB:5.2f} + "
                  f"{mapped / GIB:5.2f} GiB  {line[:100]}")
            previous = stamp
        print("\nstdout:\n  " + out.strip().replace("\n", "\n  "))
        print(f"\nexit code {code}; wall {seconds:.1f} s")
        print(f"peak RSS {peak / GIB:.2f} GiB (rusage), {hwm / GIB:.2f} GiB (VmHWM) = "
              f"{peak / size:.2f}x the model's {size / GIB:.2f} GiB (target <= 1.5x: "
              f"{'met' if peak <= 1.5 * size else 'NOT met'})")
        print(f"polled peaks: RSS {peaks[0] / GIB:.2f} GiB, RssAnon {peaks[1] / GIB:.2f} GiB (the process's own "
              f"memory), RssFile {peaks[2] / GIB:.2f} GiB (file pages mapped: the input's weights, libraries)")
        if code == 0 and not args.no_check:
            print("output:", check_output(output, model_path, samples))
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
