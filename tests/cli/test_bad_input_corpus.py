"""The bad-input corpus: one table of models, data, options, output paths and signals that onnxq must
refuse (or accept) in a stated way, run through the `onnxq` command line.

Every row names the files it needs (built in a fresh folder from `FILES`), the command line (`{d}` is that
folder), the exit code, a regex the error line must match, and the output the run must leave (or None).
`check_case` then holds every row to the same rules, the README's "What onnxq does with bad input":

* every file that existed before is byte-identical afterwards (SHA-256; symlinks keep their target), and
  nothing else appeared in the folder but the expected output: no half-written output, no temporary file;
* `$TMPDIR` (`TMPDIR`, `TEMP` and `TMP` point at a fresh folder for each row) is empty afterwards;
* a failure prints nothing on stdout and one error line on stderr, with no traceback and no "internal
  error"; click's own usage errors (exit 2) may put their two-line usage reminder before it.

Rows run in-process through `tests.support.cli.invoke`, except the signal rows, which need a real process.
A row whose expectation onnxq does not meet yet is an `xfail(strict=True)` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime  # noqa: F401  first imported here, so its telemetry file lands in the real $TMPDIR
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tests.support.cli import invoke, signal_when_started, spawn_process

MODEL, CALIB = "m.onnx", "c.npz"
SAMPLES, SHAPE = 4, (3, 8, 8)
NO_TRT = r"TensorRT is not installed: pip install 'onnxq\[trt\]'"


# ---------------------------------------------------------------- files: name -> writer(path)

def tiny_model(opset: int = 13, ir_version: int = 8, elem: int = TensorProto.FLOAT, output: str = "output",
               input_name: str = "input", bias: float | None = None) -> onnx.ModelProto:
    """Conv(3 -> 4, 3x3, pad 1) + Relu on an N x 3 x 8 x 8 input: quantizes in a few milliseconds."""
    rng = np.random.default_rng(0)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    weight = numpy_helper.from_array(rng.standard_normal((4, *SHAPE[:1], 3, 3)).astype(dtype), "w")
    biases = rng.standard_normal(4) if bias is None else np.full(4, bias)
    nodes = [helper.make_node("Conv", [input_name, "w", "b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv_out"], [output], name="relu")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, elem, ["N", *SHAPE])],
                              [helper.make_tensor_value_info(output, elem, ["N", 4, 8, 8])],
                              [weight, numpy_helper.from_array(biases.astype(dtype), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def custom_domain_model() -> onnx.ModelProto:
    model = tiny_model(output="relu_out")
    model.graph.node.append(helper.make_node("Foo", ["relu_out"], ["output"], name="foo", domain="com.example"))
    model.graph.output[0].name = "output"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def quantized_model() -> onnx.ModelProto:
    """The tiny model with a QuantizeLinear/DequantizeLinear pair on its input, as a Q/DQ export has."""
    model = tiny_model()
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "s"),
                                    numpy_helper.from_array(np.int8(0), "z")])
    model.graph.node[0].input[0] = "input_dq"
    model.graph.node.insert(0, helper.make_node("QuantizeLinear", ["input", "s", "z"], ["input_q"], name="q"))
    model.graph.node.insert(1, helper.make_node("DequantizeLinear", ["input_q", "s", "z"], ["input_dq"], name="dq"))
    return model


def save(model: Callable[[], onnx.ModelProto]) -> Callable[[Path], None]:
    return lambda path: onnx.save(model(), str(path))


def external_model(location: str | None) -> Callable[[Path], None]:
    """The tiny model with its weights in `m.bin` beside it, then each tensor's location set to `location`
    (None: left at m.bin; "{folder}" in it becomes the case folder)."""
    def write(path: Path) -> None:
        model = tiny_model()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="m.bin", size_threshold=0)
        if location is None:
            return
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location.format(folder=path.parent.parent)
        onnx.save(model, str(path))
    return write


def samples(dtype: type = np.float32, shape: tuple[int, ...] = (SAMPLES, *SHAPE), poison: float | None = None,
            ) -> np.ndarray:
    array = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    if poison is not None:
        array.flat[0] = poison
    return array


def npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.savez(path, **arrays)


class Payload:
    """Unpickling this runs a command that creates PWNED beside the data file; onnxq must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def pickled_npy(path: Path) -> None:
    np.save(path, np.array([Payload(path.with_name("PWNED"))], dtype=object), allow_pickle=True)


def pickled_npz(path: Path) -> None:
    np.savez(path, input=np.array([Payload(path.with_name("PWNED"))], dtype=object))


def pickled_stats(path: Path) -> None:
    """A statistics file whose `meta` entry is a pickled object."""
    np.savez(path, meta=np.array([Payload(path.with_name("PWNED"))], dtype=object))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


def picture(mode: str, size: tuple[int, int] = (10, 12)) -> Callable[[Path], None]:
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    pixels = np.random.default_rng(2).integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
    return lambda path: Image.fromarray(pixels, mode).save(path)


def raw(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def text(source: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(source)


def truncated(name: str, size: int) -> Callable[[Path], None]:
    """The first `size` bytes of the case file `name` (written earlier in the row's list)."""
    return lambda path: path.write_bytes(path.parent.joinpath(name).read_bytes()[:size])


def statistics(model: str) -> Callable[[Path], None]:
    """A statistics file `onnxq calibrate` wrote for the case file `model` on c.npz."""
    def write(path: Path) -> None:
        outcome = invoke("calibrate", path.parent / model, "--calib", path.parent / CALIB, "-o", path)
        assert outcome.code == 0, outcome
    return write


def link(target: str, hard: bool = False) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        source = path.parent.parent / target if path.parent.name == "out" else path.parent / target
        os.link(source, path) if hard else path.symlink_to(source)
    return write


def image_folder(*extra: str) -> tuple[str, ...]:
    """Three good RGB pictures in imgs/, then the `extra` files (also in imgs/)."""
    return ("imgs/a.png", "imgs/b.png", "imgs/c.png", *(f"imgs/{name}" for name in extra))


FILES: dict[str, Callable[[Path], None]] = {
    MODEL: save(tiny_model),
    CALIB: npz(input=samples()),
    "other.onnx": save(lambda: tiny_model(bias=1.0)),
    "renamed_input.onnx": save(lambda: tiny_model(input_name="x")),
    "renamed_output.onnx": save(lambda: tiny_model(output="y")),
    "folder.onnx/": lambda path: path.mkdir(),
    "empty.onnx": raw(b""),
    "truncated.onnx": truncated(MODEL, 200),
    "notes.onnx": text("this is not a model\n"),
    "opset7.onnx": save(lambda: tiny_model(opset=7, ir_version=4)),
    "opset8.onnx": save(lambda: tiny_model(opset=8, ir_version=4)),
    "opset99.onnx": save(lambda: tiny_model(opset=99)),
    "ir99.onnx": save(lambda: tiny_model(ir_version=99)),
    "custom.onnx": save(custom_domain_model),
    "fp16.onnx": save(lambda: tiny_model(elem=TensorProto.FLOAT16)),
    "qdq.onnx": save(quantized_model),
    "ext/m.onnx": external_model(None),
    "ext/up.onnx": external_model("../outside.bin"),
    "ext/abs.onnx": external_model("{folder}/outside.bin"),
    "ext/gone.onnx": external_model("gone.bin"),
    "outside.bin": lambda path: path.write_bytes(path.parent.joinpath("ext", "m.bin").read_bytes()),
    "pickled.npy": pickled_npy,
    "pickled.npz": pickled_npz,
    "pickled_stats.npz": pickled_stats,
    "other_key.npz": npz(image=samples()),
    "extra_key.npz": npz(input=samples(), mask=samples()),
    "no_arrays.npz": npz(),
    "int32.npz": npz(input=samples(np.int32)),
    "float64.npz": npz(input=samples(np.float64)),
    "float16.npz": npz(input=samples(np.float16)),
    "rank3.npz": npz(input=samples(shape=SHAPE)),
    "wrong_dim.npz": npz(input=samples(shape=(SAMPLES, 3, 8, 9))),
    "zero_samples.npz": npz(input=samples(shape=(0, *SHAPE))),
    "nan.npz": npz(input=samples(poison=np.nan)),
    "inf.npz": npz(input=samples(poison=np.inf)),
    "all_nan.npz": npz(input=np.full((SAMPLES, *SHAPE), np.nan, np.float32)),
    "bad.npy": raw(b"\x93NUMPY not an array"),
    "bad.npz": raw(b"PK not a zip archive"),
    "data.txt": text("1 2 3\n"),
    "empty_dir/": lambda path: path.mkdir(),
    "mixed/a.npz": npz(input=samples()),
    "mixed/a.png": picture("RGB"),
    "imgs/a.png": picture("RGB"),
    "imgs/b.png": picture("RGB"),
    "imgs/c.png": picture("RGB"),
    "imgs/notes.txt": text("not a picture\n"),
    "imgs/.DS_Store": raw(b"\0\1\2"),
    "imgs/Thumbs.db": raw(b"\0\1\2"),
    "imgs/corrupt.jpg": raw(b"\xff\xd8\xff\xe0 not really a JPEG"),
    "imgs/zero.png": raw(b""),
    "imgs/gray.png": picture("L"),
    "imgs/rgba.png": picture("RGBA"),
    "imgs/one_pixel.png": picture("RGB", (1, 1)),
    "imgs/bomb.png": raw(png_header(100_000, 100_000)),
    "imgs/big.png": raw(png_header(9_500, 9_500)),
    "syntax.py": text("def load_data(:\n"),
    "raises.py": text("def load_data():\n    raise RuntimeError('the data server is down')\n"),
    "number.py": text("def load_data():\n    return 42\n"),
    "exits.py": text("import sys\n\ndef load_data():\n    sys.exit(3)\n"),
    "nothing.py": text("def load_data():\n    return []\n"),
    "lists.py": text("def load_data():\n    yield {'input': [[1.0, 2.0]]}\n"),
    "slow.py": text("import time\nfrom pathlib import Path\nimport numpy as np\n\ndef load_data():\n"
                    "    Path(__file__).parent.parent.joinpath('started').touch()\n"
                    "    while True:\n        time.sleep(0.05)\n"
                    "        yield {'input': np.zeros((1, 3, 8, 8), np.float32)}\n"),
    "out/old.onnx": raw(b"an older output"),
    "out/link.onnx": link(MODEL),
    "out/hard.onnx": link(MODEL, hard=True),
    "out/link.npz": link(CALIB),
    "s.npz": statistics(MODEL),
    "s_other.npz": statistics("other.onnx"),
    "s_truncated.npz": truncated("s.npz", 100),
}


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    """One row: files to create, the command line (`{d}`: the case folder), what must come of it.

    `stderr` is searched in the error line (exit != 0) or in the whole stderr (exit 0; None: stderr empty).
    `output` is the file, relative to the case folder, that the run must leave (None: nothing new).
    `signal`: run as a real process and send it once the loader has started (the slow.py rows).
    """

    id: str
    argv: str
    files: tuple[str, ...]
    code: int
    stderr: str | None
    output: str | None = None
    xfail: str | None = None
    signal: int | None = None


# What each command makes of a model file; `{m}` is the model's path. Output: what a success leaves.
MODEL_COMMANDS = {
    "quantize": ("quantize {m} --calib {d}/c.npz -o {d}/out/q.onnx", "out/q.onnx"),
    "calibrate": ("calibrate {m} --calib {d}/c.npz -o {d}/out/s.npz", "out/s.npz"),
    "inspect": ("inspect {m}", None),
    "compare": ("compare {m} {d}/m.onnx --data {d}/c.npz --warmup 0 --iterations 1", None),
    "build": ("build {m} -o {d}/out/m.plan", None),
}
# What each command makes of a data path `{data}`.
DATA_COMMANDS = {
    "quantize": ("quantize {d}/m.onnx --calib {data} -o {d}/out/q.onnx", "out/q.onnx"),
    "calibrate": ("calibrate {d}/m.onnx --calib {data} -o {d}/out/s.npz", "out/s.npz"),
    "eval": ("quantize {d}/m.onnx --calib {d}/c.npz --eval {data} -o {d}/out/q.onnx", "out/q.onnx"),
    "compare": ("compare {d}/m.onnx {d}/m.onnx --data {data} --warmup 0 --iterations 1", None),
}


def rows_for(kind: str, label: str, commands: dict[str, tuple[str, object]], chosen: tuple[str, ...], key: str,
             value: str, code: int, pattern: str | None, files: tuple[str, ...],
             override: dict[str, tuple[int, str | None]], xfail: dict[str, str]) -> list[Case]:
    """One row per chosen command, `key` in its template replaced by `value`; `override` gives a command
    another (code, pattern), `xfail` a reason it fails today. What a success leaves comes from `commands`."""
    rows = []
    for command in chosen:
        template, output = commands[command]
        row_code, row_pattern = override.get(command, (code, pattern))
        rows.append(Case(f"{kind}-{label}-{command}", template.replace(key, value), files, row_code, row_pattern,
                         output if row_code == 0 and isinstance(output, str) else None, xfail.get(command)))
    return rows


def model_rows(label: str, model: str, code: int, pattern: str | None, files: tuple[str, ...] = (),
               xfail: dict[str, str] | None = None, **override: tuple[int, str | None]) -> list[Case]:
    """Every command on a model file; `build` always stops first at the missing TensorRT (exit 2)."""
    override.setdefault("build", (2, NO_TRT))
    return rows_for("model", label, MODEL_COMMANDS, tuple(MODEL_COMMANDS), "{m}", "{d}/" + model, code, pattern,
                    (MODEL, CALIB, *files), override, xfail or {})


def data_rows(label: str, data: str, code: int, pattern: str | None, files: tuple[str, ...] | None = None,
              commands: tuple[str, ...] = tuple(DATA_COMMANDS), xfail: dict[str, str] | None = None) -> list[Case]:
    """Every command reading data on a data path (relative to the case folder); `files` default to (data,)."""
    needed = (MODEL, CALIB, *((data,) if files is None else files))
    return rows_for("data", label, DATA_COMMANDS, commands, "{data}", "{d}/" + data, code, pattern, needed, {},
                    xfail or {})


def quantize_row(label: str, extra: str, code: int, pattern: str | None, files: tuple[str, ...] = (),
                 output: str | None = None, xfail: str | None = None) -> Case:
    return Case(label, "quantize {d}/m.onnx --calib {d}/c.npz -o {d}/out/q.onnx " + extra, (MODEL, CALIB, *files),
                code, pattern, output, xfail)


MODEL_READERS = ("quantize", "calibrate", "inspect", "compare")
SIGNAL_LOADER = "quantize {d}/m.onnx --calib {d}/slow.py -o {d}/out/q.onnx"

MODEL_CASES = [
    *model_rows("missing", "absent.onnx", 1, r"absent\.onnx: no such model file"),
    *model_rows("directory", "folder.onnx", 2, r"'.*folder\.onnx' is a directory", ("folder.onnx/",),
                build=(2, r"'.*folder\.onnx' is a directory")),
    *model_rows("empty", "empty.onnx", 1, r"empty\.onnx: not an ONNX model", ("empty.onnx",)),
    *model_rows("truncated", "truncated.onnx", 1, r"truncated\.onnx: not a readable ONNX model",
                ("truncated.onnx",)),
    *model_rows("text", "notes.onnx", 1, r"notes\.onnx: not an? (readable )?ONNX model", ("notes.onnx",)),
    *model_rows("opset7", "opset7.onnx", 0, None, ("opset7.onnx",)),
    *model_rows("opset8", "opset8.onnx", 0, None, ("opset8.onnx",)),
    *model_rows("future-opset", "opset99.onnx", 1, r"opset99\.onnx.*[Oo]pset 99", ("opset99.onnx",)),
    *model_rows("future-ir", "ir99.onnx", 1, r"ir99\.onnx.*IR version:? 99", ("ir99.onnx",)),
    *model_rows("custom-domain", "custom.onnx", 1, r"com\.example:Foo", ("custom.onnx",), inspect=(0, None)),
    *model_rows("already-quantized", "qdq.onnx", 1, r"already quantized \(contains DequantizeLinear, QuantizeLinear\)",
                ("qdq.onnx",), compare=(0, None)),
    *model_rows("external-data", "ext/m.onnx", 0, None, ("ext/m.onnx",)),
    *model_rows("external-data-above-folder", "ext/up.onnx", 1, r"up\.onnx.*outside", ("ext/up.onnx", "outside.bin")),
    *model_rows("external-data-absolute", "ext/abs.onnx", 1, r"abs\.onnx.*absolute", ("ext/abs.onnx", "outside.bin")),
    *model_rows("external-data-missing", "ext/gone.onnx", 1, r"gone\.onnx.*gone\.bin", ("ext/gone.onnx",)),
    Case("model-fp16-quantize", "quantize {d}/fp16.onnx --calib {d}/float16.npz -o {d}/out/q.onnx",
         ("fp16.onnx", "float16.npz"), 1, r"input 'input' is float16: onnxq quantizes float32 models"),
    Case("model-fp16-calibrate", "calibrate {d}/fp16.onnx --calib {d}/float16.npz -o {d}/out/s.npz",
         ("fp16.onnx", "float16.npz"), 0, None, "out/s.npz"),
    Case("model-fp16-inspect", "inspect {d}/fp16.onnx", ("fp16.onnx",), 0, None),
    Case("compare-renamed-input", "compare {d}/m.onnx {d}/renamed_input.onnx --data {d}/c.npz",
         (MODEL, CALIB, "renamed_input.onnx"), 1, r"input 'input' of the float model is not an input of the quantized"),
    Case("compare-renamed-output", "compare {d}/m.onnx {d}/renamed_output.onnx --data {d}/c.npz",
         (MODEL, CALIB, "renamed_output.onnx"), 1, r"outputs differ: only in the float model 'output'.*'y'"),
    Case("compare-corrupt-quant", "compare {d}/m.onnx {d}/truncated.onnx --data {d}/c.npz",
         (MODEL, CALIB, "truncated.onnx"), 1, r"truncated\.onnx: not a readable ONNX model"),
]

DATA_CASES = [
    *data_rows("missing", "nowhere.npz", 1, r"nowhere\.npz: no such file or directory", files=()),
    *data_rows("pickled-npy", "pickled.npy", 1, r"pickled\.npy: input 'input' holds Python objects.*never unpickles"),
    *data_rows("object-npz", "pickled.npz", 1, r"pickled\.npz: input 'input' holds Python objects.*never unpickles"),
    *data_rows("missing-key", "other_key.npz", 1, r"other_key\.npz: array 'image' is not a model input.*'input'"),
    *data_rows("extra-key", "extra_key.npz", 1, r"extra_key\.npz: array 'mask' is not a model input"),
    *data_rows("no-arrays", "no_arrays.npz", 1, r"no_arrays\.npz: no array for input 'input' \(N, 3, 8, 8\) float32"),
    *data_rows("int-for-float", "int32.npz", 1,
               r"int32\.npz: input 'input' has dtype int32; the model expects float32"),
    *data_rows("float64", "float64.npz", 1, r"input 'input' has dtype float64; the model expects float32"),
    *data_rows("wrong-rank", "rank3.npz", 1, r"input 'input' has shape \(3, 8, 8\) \(rank 3\); the model expects "
               r"\(N, 3, 8, 8\) \(rank 4\)\. Hint: add the sample axis"),
    *data_rows("wrong-fixed-dim", "wrong_dim.npz", 1, r"has shape \(4, 3, 8, 9\); the model expects \(N, 3, 8, 8\)"),
    *data_rows("zero-samples", "zero_samples.npz", 1, r"input 'input' holds no samples \(axis 0 has size 0\)"),
    *data_rows("nan", "nan.npz", 0, r"tensor 'input': 1 NaN and 0 Inf values ignored",
               commands=("quantize", "calibrate")),
    *data_rows("inf", "inf.npz", 0, r"tensor 'input': 0 NaN and 1 Inf values ignored",
               commands=("quantize", "calibrate")),
    *data_rows("all-nan", "all_nan.npz", 1, r"tensor 'input': every calibration value is NaN",
               commands=("quantize", "calibrate")),
    *data_rows("corrupt-npy", "bad.npy", 1, r"bad\.npy: not a readable \.npy file"),
    *data_rows("corrupt-npz", "bad.npz", 1, r"bad\.npz: not a readable \.npz file"),
    *data_rows("text-file", "data.txt", 1, r"data\.txt: unsupported calibration data"),
    *data_rows("empty-folder", "empty_dir", 1, r"empty_dir: the directory holds no calibration files", ("empty_dir/",)),
    *data_rows("mixed-folder", "mixed", 1, r"mixed: the directory mixes array files \(a\.npz, \.\.\.\) and images",
               ("mixed/a.npz", "mixed/a.png")),
    *data_rows("images", "imgs", 0, None, image_folder()),
    *data_rows("images-with-junk", "imgs", 0, None, image_folder("notes.txt", ".DS_Store", "Thumbs.db")),
    *data_rows("corrupt-jpeg", "imgs", 1, r"corrupt\.jpg: not a readable image", image_folder("corrupt.jpg")),
    *data_rows("zero-byte-image", "imgs", 1, r"zero\.png: not a readable image", image_folder("zero.png")),
    *data_rows("grayscale-image", "imgs", 0, None, image_folder("gray.png")),
    *data_rows("rgba-image", "imgs", 0, None, image_folder("rgba.png")),
    *data_rows("one-pixel-image", "imgs", 0, None, image_folder("one_pixel.png")),
    *data_rows("decompression-bomb", "imgs", 1, r"bomb\.png: the image is too large to decode safely: Image size "
               r"\(10000000000 pixels\) exceeds limit", image_folder("bomb.png")),
    *data_rows("image-above-limit", "imgs", 1, r"big\.png: the image is too large to decode safely: Image size "
               r"\(90250000 pixels\) exceeds limit", image_folder("big.png")),
    *data_rows("loader-syntax-error", "syntax.py", 1, r"syntax\.py: importing the data loader failed: SyntaxError"),
    *data_rows("loader-raises", "raises.py", 1, r"raises\.py:load_data raised RuntimeError after 0 feeds: "
               r"the data server is down"),
    *data_rows("loader-returns-int", "number.py", 1,
               r"number\.py:load_data returned int; it must return or yield dicts"),
    *data_rows("loader-no-function", "number.py:nope", 1, r"number\.py: no function 'nope'", ("number.py",)),
    *data_rows("loader-missing", "absent.py", 1, r"absent\.py: no such data-loader script", ()),
    *data_rows("loader-no-feeds", "nothing.py", 1, r"nothing\.py:load_data produced no feeds"),
    *data_rows("loader-lists", "lists.py", 1, r"lists\.py:load_data feed 0: input 'input' is a list, not a numpy array"),
    *data_rows("loader-sys-exit", "exits.py", 1, r"exits\.py.*SystemExit", commands=("quantize", "calibrate")),
    Case("data-fp16-model-float32-data", "calibrate {d}/fp16.onnx --calib {d}/c.npz -o {d}/out/s.npz",
         (CALIB, "fp16.onnx"), 1, r"c\.npz: input 'input' has dtype float32; the model expects float16"),
]

OPTION_CASES = [
    quantize_row("option-method-nope", "--method nope", 2, r"Invalid value for '--method': 'nope' is not one of"),
    quantize_row("option-percentile-0", "--method percentile --percentile 0", 2,
                 r"--percentile must be in \(0, 100\], got 0"),
    quantize_row("option-percentile-101", "--method percentile --percentile 101", 2,
                 r"--percentile must be in \(0, 100\], got 101"),
    quantize_row("option-batch-size-0", "--batch-size 0", 2,
                 r"Invalid value for '--batch-size': 0 is not in the range"),
    quantize_row("option-smoothquant-2", "--smoothquant 2", 2, r"'--smoothquant': alpha must be in \(0, 1\)"),
    quantize_row("option-smoothquant-word", "--smoothquant lots", 2, r"'lots' is neither auto nor a number"),
    quantize_row("option-smoothquant-twice", "--smoothquant 0.5 --no-smoothquant", 2,
                 r"give --smoothquant or --no-smoothquant, not both"),
    quantize_row("option-target-nope", "--target nope", 2, r"Invalid value for '--target': 'nope' is not one of trt"),
    quantize_row("option-exclude-op-types", "--exclude-op-types Nonsense", 2,
                 r"--exclude-op-types: 'Nonsense' is not an ONNX op type"),
    quantize_row("option-exclude-op-types-typo", "--exclude-op-types Relu,Convv", 2, r"did you mean 'Conv'"),
    quantize_row("option-exclude-nodes-regex", "--exclude-nodes (", 2, r"--exclude-nodes: invalid regular expression"),
    quantize_row("option-providers", "--providers nosuch", 2, r"--providers: unknown execution provider 'nosuch'"),
    quantize_row("option-high-precision", "--high-precision int4", 2, r"Invalid value for '--high-precision'"),
    quantize_row("option-mean", "--mean 1,2", 2, r"--mean: expected 1 or 3 values, got 2"),
    quantize_row("option-std-zero", "--std 0", 2, r"--std values must be non-zero"),
    quantize_row("option-image-size", "--image-size big", 2, r"--image-size: expected HxW such as 224x224, got 'big'"),
    quantize_row("option-resize-0", "--resize 0", 2, r"--resize must be a positive integer, got 0"),
    quantize_row("option-min-cosine", "--min-cosine 2", 2, r"--min-cosine must be in \[-1, 1\], got 2"),
    quantize_row("option-write-anyway-alone", "--write-anyway", 2, r"--write-anyway needs an accuracy target"),
    quantize_row("option-held-back-0", "--held-back 0", 2, r"Invalid value for '--held-back'"),
    quantize_row("option-unknown", "--bogus", 2, r"No such option '--bogus'"),
    quantize_row("option-engine-without-tensorrt", "--engine {d}/out/q.plan", 2, NO_TRT),
    quantize_row("option-calib-and-stats", "--stats {d}/s.npz", 2, r"give --calib PATH or --stats FILE \(one of them\)",
                 ("s.npz",)),
    Case("option-neither-calib-nor-stats", "quantize {d}/m.onnx -o {d}/out/q.onnx", (MODEL,), 2,
         r"give --calib PATH or --stats FILE \(one of them\)"),
    Case("option-calibrate-batch-size-0", "calibrate {d}/m.onnx --calib {d}/c.npz --batch-size 0", (MODEL, CALIB), 2,
         r"Invalid value for '--batch-size'"),
    Case("option-calibrate-target-nope", "calibrate {d}/m.onnx --calib {d}/c.npz --target nope", (MODEL, CALIB), 2,
         r"Invalid value for '--target'"),
    Case("option-calibrate-missing-calib", "calibrate {d}/m.onnx", (MODEL,), 2, r"Missing option '--calib'"),
    Case("option-calibrate-shard-past-the-end", "calibrate {d}/m.onnx --calib {d}/c.npz --shard 4/4", (MODEL, CALIB), 2,
         r"shard 4/4: the index must be 0 to 3 .*numbered from 0"),
    Case("option-calibrate-shard-text", "calibrate {d}/m.onnx --calib {d}/c.npz --shard half", (MODEL, CALIB), 2,
         r"--shard: expected INDEX/COUNT such as 0/4"),
    Case("option-calibrate-shard-empty", "calibrate {d}/m.onnx --calib {d}/c.npz --shard 0/5", (MODEL, CALIB), 1,
         rf"shard 0/5 of {SAMPLES} samples in .*c\.npz holds no samples: {SAMPLES} samples split 5 ways; use at most "
         rf"{SAMPLES} shards"),
    Case("option-calibrate-shard-loader-without-arguments",
         "calibrate {d}/m.onnx --calib {d}/nothing.py --shard 0/2 -o {d}/out/s.npz", (MODEL, "nothing.py"), 2,
         r"--shard 0/2: .*nothing\.py:load_data takes no shard_index and num_shards arguments"),
    Case("option-inspect-exclude-op-types", "inspect {d}/m.onnx --exclude-op-types Nonsense", (MODEL,), 2,
         r"'Nonsense' is not an ONNX op type"),
    Case("option-compare-iterations-0", "compare {d}/m.onnx {d}/m.onnx --data {d}/c.npz --iterations 0",
         (MODEL, CALIB), 2, r"Invalid value for '--iterations'"),
    Case("option-compare-backend-trt", "compare {d}/m.onnx {d}/m.onnx --data {d}/c.npz --backend trt", (MODEL, CALIB),
         2, r"--backend trt: " + NO_TRT),
    Case("option-build-shapes", "build {d}/m.onnx --shapes garbage", (MODEL,), 2,
         r"--shapes: 'garbage' is not NAME:DxD"),
    Case("option-stats-merge-one-file", "stats merge {d}/s.npz -o {d}/out/all.npz", (MODEL, CALIB, "s.npz"), 2,
         r"give at least two statistics files to merge"),
]

# The output argument of every command that writes a file; `{o}` is the path given.
OUTPUT_COMMANDS = {
    "quantize": ("quantize {d}/m.onnx --calib {d}/c.npz -o {o}", (MODEL, CALIB)),
    "calibrate": ("calibrate {d}/m.onnx --calib {d}/c.npz -o {o}", (MODEL, CALIB)),
    "compare": ("compare {d}/m.onnx {d}/m.onnx --data {d}/c.npz --warmup 0 --iterations 1 --json {o}", (MODEL, CALIB)),
    "stats-merge": ("stats merge {d}/s.npz {d}/s.npz -o {o}", (MODEL, CALIB, "s.npz")),
    "build": ("build {d}/m.onnx -o {o}", (MODEL,)),
}


def output_rows(label: str, target: str, code: int, pattern: str | None,
                commands: tuple[str, ...] = tuple(OUTPUT_COMMANDS), xfail: dict[str, str] | None = None) -> list[Case]:
    """Every writing command with `target` as its output; `build` stops first at the missing TensorRT."""
    rows = []
    for command in commands:
        template, needed = OUTPUT_COMMANDS[command]
        row_code, row_pattern = (2, NO_TRT) if command == "build" else (code, pattern)
        rows.append(Case(f"output-{label}-{command}", template.replace("{o}", target), needed, row_code, row_pattern,
                         xfail=(xfail or {}).get(command)))
    return rows


OUTPUT_CASES = [
    *output_rows("missing-folder", "{d}/nope/result", 1,
                 r"nope/result.*(the folder .*nope does not exist|No such file)"),
    *output_rows("is-a-folder", "{d}/out", 2, r"out('| is a folder| is a directory)"),
    *output_rows("unwritable-folder", "/proc/onnxq-result", 1, r"/proc/onnxq-result: cannot write"),
    *output_rows("names-the-model", "{d}/m.onnx", 2, r"-o .*m\.onnx names the input model; refusing to overwrite it",
                 commands=("quantize", "calibrate", "build")),
    Case("output-names-the-model-compare", "compare {d}/m.onnx {d}/m.onnx --data {d}/c.npz --json {d}/m.onnx",
         (MODEL, CALIB), 2, r"--json .*m\.onnx names the input model"),
    Case("output-names-the-data-quantize", "quantize {d}/m.onnx --calib {d}/c.npz -o {d}/c.npz", (MODEL, CALIB), 2,
         r"-o .*c\.npz names the input file .*c\.npz; refusing to overwrite it"),
    Case("output-names-the-data-calibrate", "calibrate {d}/m.onnx --calib {d}/c.npz -o {d}/c.npz", (MODEL, CALIB), 2,
         r"-o .*c\.npz names the input file"),
    Case("output-names-the-eval-data", "quantize {d}/m.onnx --calib {d}/c.npz --eval {d}/float64.npz -o "
         "{d}/float64.npz", (MODEL, CALIB, "float64.npz"), 2, r"-o .*float64\.npz names the input file"),
    Case("output-names-the-stats", "quantize {d}/m.onnx --stats {d}/s.npz -o {d}/s.npz", (MODEL, CALIB, "s.npz"), 2,
         r"-o .*s\.npz names the input file"),
    Case("output-symlink-to-the-model", "quantize {d}/m.onnx --calib {d}/c.npz -o {d}/out/link.onnx",
         (MODEL, CALIB, "out/link.onnx"), 2, r"link\.onnx names the input model"),
    Case("output-hard-link-to-the-model", "quantize {d}/m.onnx --calib {d}/c.npz -o {d}/out/hard.onnx",
         (MODEL, CALIB, "out/hard.onnx"), 2, r"hard\.onnx names the input model"),
    Case("output-dotdot-to-the-model", "quantize {d}/m.onnx --calib {d}/c.npz -o {d}/out/../m.onnx",
         (MODEL, CALIB), 2, r"names the input model"),
    Case("output-symlink-to-the-data", "calibrate {d}/m.onnx --calib {d}/c.npz -o {d}/out/link.npz",
         (MODEL, CALIB, "out/link.npz"), 2, r"link\.npz names the input file"),
    Case("output-stats-merge-names-an-input", "stats merge {d}/s.npz {d}/s.npz -o {d}/s.npz", (MODEL, CALIB, "s.npz"),
         2, r"-o .*s\.npz names the input file"),
    Case("output-engine-names-the-model", "build {d}/m.onnx -o {d}/m.onnx", (MODEL,), 2, NO_TRT),
    Case("output-existing-file-is-replaced", "quantize {d}/m.onnx --calib {d}/c.npz -o {d}/out/old.onnx",
         (MODEL, CALIB, "out/old.onnx"), 0, None, "out/old.onnx"),
]

STATS_CASES = [
    Case("stats-of-another-model", "quantize {d}/m.onnx --stats {d}/s_other.npz -o {d}/out/q.onnx",
         (MODEL, CALIB, "other.onnx", "s_other.npz"), 1, r"s_other\.npz: .*collected for a different model"),
    Case("stats-other-equalize-setting", "quantize {d}/m.onnx --stats {d}/s.npz --no-equalize -o {d}/out/q.onnx",
         (MODEL, CALIB, "s.npz"), 1, r"collected after cross-layer equalization"),
    Case("stats-bias-correction", "quantize {d}/m.onnx --stats {d}/s.npz --bias-correction -o {d}/out/q.onnx",
         (MODEL, CALIB, "s.npz"), 2, r"--bias-correction needs --calib"),
    Case("stats-missing-file", "quantize {d}/m.onnx --stats {d}/absent.npz -o {d}/out/q.onnx", (MODEL,), 1,
         r"absent\.npz: no such statistics file"),
    Case("stats-calibration-data-as-stats", "quantize {d}/m.onnx --stats {d}/c.npz -o {d}/out/q.onnx",
         (MODEL, CALIB), 1, r"c\.npz: not an onnxq statistics file"),
    Case("stats-corrupt-quantize", "quantize {d}/m.onnx --stats {d}/s_truncated.npz -o {d}/out/q.onnx",
         (MODEL, CALIB, "s.npz", "s_truncated.npz"), 1, r"s_truncated\.npz: unreadable statistics file"),
    Case("stats-corrupt-show", "stats show {d}/s_truncated.npz", (MODEL, CALIB, "s.npz", "s_truncated.npz"), 1,
         r"s_truncated\.npz: unreadable statistics file"),
    Case("stats-pickled-show", "stats show {d}/pickled_stats.npz", ("pickled_stats.npz",), 1,
         r"pickled_stats\.npz: not an onnxq statistics file \(Object arrays cannot be loaded when "
         r"allow_pickle=False\)"),
    Case("stats-pickled-quantize", "quantize {d}/m.onnx --stats {d}/pickled_stats.npz -o {d}/out/q.onnx",
         (MODEL, "pickled_stats.npz"), 1, r"pickled_stats\.npz: not an onnxq statistics file"),
    Case("stats-merge-different-models", "stats merge {d}/s.npz {d}/s_other.npz -o {d}/out/all.npz",
         (MODEL, CALIB, "other.onnx", "s.npz", "s_other.npz"), 1,
         r"merging .*s_other\.npz: collected for different models"),
    Case("stats-merge-not-stats", "stats merge {d}/s.npz {d}/c.npz -o {d}/out/all.npz", (MODEL, CALIB, "s.npz"), 1,
         r"c\.npz: not an onnxq statistics file"),
    Case("stats-merge-missing-file", "stats merge {d}/s.npz {d}/absent.npz -o {d}/out/all.npz",
         (MODEL, CALIB, "s.npz"), 1, r"absent\.npz: no such statistics file"),
    Case("stats-show-missing-file", "stats show {d}/absent.npz", (), 1, r"absent\.npz: no such statistics file"),
]

SIGNAL_CASES = [
    Case("signal-sigint-during-calibration", SIGNAL_LOADER, (MODEL, "slow.py"), 130, r"^interrupted$",
         signal=signal.SIGINT),
    Case("signal-sigterm-during-calibration", SIGNAL_LOADER, (MODEL, "slow.py"), -signal.SIGTERM, None,
         signal=signal.SIGTERM),
]

CASES = [*MODEL_CASES, *DATA_CASES, *OPTION_CASES, *OUTPUT_CASES, *STATS_CASES, *SIGNAL_CASES]


# ---------------------------------------------------------------- the checker

def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (relative path) -> what it is: a file's SHA-256, a symlink's target, or dir."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            key = path.relative_to(folder).as_posix()
            if path.is_symlink():
                entries[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                entries[key] = "dir"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def make_files(folder: Path, names: tuple[str, ...]) -> None:
    (folder / "out").mkdir(parents=True)
    for name in names:
        path = folder / name.rstrip("/")
        if path.exists() or path.is_symlink():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        FILES[name](path)


def run_with_signal(argv: list[str], case_folder: Path, sent: int) -> tuple[int, str, str]:
    """`onnxq ARGV` as a real process, sent `sent` once its loader has started; (code, stdout, stderr)."""
    marker = case_folder.parent / "started"
    outcome = signal_when_started(spawn_process(*argv, cwd=case_folder), marker, sent, settle=0.2)
    marker.unlink()
    return outcome


USAGE_REMINDER = re.compile(r"^(Usage: onnxq .*|Try 'onnxq .* (-h|--help)' for help\.|)$")


def check_outcome(case: Case, code: int, stdout: str, stderr: str) -> None:
    """The exit code, and the error: one line, matching the row's pattern, no traceback, nothing on stdout."""
    assert code == case.code, (code, stdout, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    if code == 0:
        assert re.search(case.stderr, stderr) if case.stderr else stderr == "", stderr
        return
    assert stdout == "", stdout
    lines = stderr.splitlines()
    if case.signal is not None:
        assert re.search(case.stderr, stderr.strip()) if case.stderr else stderr == "", stderr
        return
    errors = [line for line in lines if line.startswith(("error: ", "Error: "))]
    assert len(errors) == 1, stderr
    assert re.search(case.stderr or "", errors[0]), errors[0]
    others = [line for line in lines if line not in errors]
    assert not others or (code == 2 and all(USAGE_REMINDER.match(line) for line in others)), stderr


def check_case(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one row and hold it to the corpus rules (see the module docstring)."""
    folder, scratch = tmp_path / "case", tmp_path / "tmpdir"
    scratch.mkdir()
    for variable in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.setenv(variable, str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads the variables again
    make_files(folder, case.files)
    before = snapshot(folder)
    argv = [arg.replace("{d}", str(folder)) for arg in case.argv.split()]
    if case.signal is not None:
        code, stdout, stderr = run_with_signal(argv, folder, case.signal)
    else:
        code, stdout, stderr = invoke(*argv)
    check_outcome(case, code, stdout, stderr)
    after = snapshot(folder)
    expected_names = set(before) | ({case.output} if case.output else set())
    assert set(after) == expected_names, sorted(set(after) ^ expected_names)
    assert {k: v for k, v in after.items() if k != case.output} == {k: v for k, v in before.items()
                                                                    if k != case.output}
    if case.output:
        assert after[case.output] != before.get(case.output), f"{case.output} was not written"
        if case.output.endswith(".onnx"):
            onnx.checker.check_model(str(folder / case.output), full_check=True)
    # ONNX Runtime's telemetry writes its session file `.ses` into $TMPDIR when a process first imports it
    # (kept and reused by later runs, like a cache): not onnxq's leftover. The in-process rows share one import.
    assert [path.name for path in scratch.iterdir() if not (case.signal and path.name == ".ses")] == []


def _param(case: Case) -> object:
    marks = []
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=f"issue 12: {case.xfail}"))
    if case.signal is not None and sys.platform == "win32":
        marks.append(pytest.mark.skip(reason="POSIX signals"))
    if "/proc/" in case.argv and not Path("/proc").is_dir():
        marks.append(pytest.mark.skip(reason="/proc is the unwritable folder"))
    return pytest.param(case, id=case.id, marks=marks)


def test_ids_are_unique() -> None:
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row: its exit code and error line, inputs byte-identical, nothing left behind, $TMPDIR empty."""
    check_case(case, tmp_path, monkeypatch)
