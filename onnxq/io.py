"""The boundary between files, `onnx.ModelProto` and onnx-graphsurgeon graphs.

Loading keeps the model's metadata so that the quantized model can carry it on; saving is atomic
(a temporary file in the target folder, then a rename) and switches to external data above 2 GB.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.external_data_helper
import onnx.helper
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from onnxq.errors import ModelError

__all__ = [
    "load_model",
    "save_model",
    "to_graph",
    "from_graph",
    "check_model",
    "is_same_file",
    "EXTERNAL_DATA_THRESHOLD",
]

log = logging.getLogger(__name__)

# Protobuf refuses to serialise messages of 2 GiB or more; stay clear of the limit.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model, with its external data, or raise a one-line ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{path}: not a readable ONNX model ({first_line})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no graph or no opset)")
    return model


def _tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) + 4 * len(t.float_data) for t in model.graph.initializer)


def is_same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when both paths name one file: same path, a symlink to it, or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write `model` to `path` atomically; models over 2 GB get their weights in `<name>.data` beside it.

    The model is first written into a temporary folder inside the target folder, then moved into place
    with `os.replace`, so an interrupted save never leaves a half-written model at `path`.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelError(f"{path}: the folder {folder} does not exist")
    external = _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    try:
        staged_model = staging / path.name
        if external:
            onnx.save_model(model, str(staged_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(staging / data_name, folder / data_name)
            # onnx.save_model moved the weights out of `model`; read them back so the caller's model is intact.
            onnx.external_data_helper.load_external_data_for_model(model, str(folder))
        else:
            onnx.save_model(model, str(staged_model))
        os.replace(staged_model, path)
    except OSError as err:
        raise ModelError(f"{path}: cannot write the model ({err.strerror or err})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import `model` into onnx-graphsurgeon after ONNX shape inference (so tensors carry dtypes)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as err:
        log.warning("shape inference failed, continuing without it: %s", str(err).splitlines()[0])
        inferred = model
    return gs.import_onnx(inferred)


def from_graph(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export `graph`, carrying over `template`'s metadata, and write an IR version runtimes accept.

    The IR version is the lowest one that supports the model's opsets: ONNX Runtime rejects the newest
    IR versions long before it rejects the opsets they go with.
    """
    model = gs.export_onnx(graph, do_type_check=False)
    if template is not None:
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(model, field, getattr(template, field))
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return model


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    """Run the full ONNX checker (with shape inference), raising a one-line ModelError."""
    try:
        if _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp) / "model.onnx"
                onnx.save_model(model, str(staged), save_as_external_data=True, location="model.data")
                onnx.checker.check_model(str(staged), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ModelError(f"{what} fails the ONNX checker: {str(err).strip().splitlines()[0]}") from None
