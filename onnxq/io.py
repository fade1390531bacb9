"""The boundary between files, `onnx.ModelProto` and onnx-graphsurgeon graphs.

Loading keeps the model's metadata so that the quantized model can carry it on; saving is atomic
(a temporary file in the target folder, then a rename) and switches to external data above 2 GB.
Models that large never go through protobuf serialization (see `onnxq.external_data`): shape inference
and the checker see a skeleton without the weights, and saving streams the weights one tensor at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.helper
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

import onnxq.external_data as external_data
import onnxq.mapped_weights as mapped_weights
from onnxq.atomic import staging_name
from onnxq.errors import ModelError

__all__ = [
    "load_model",
    "save_model",
    "to_graph",
    "from_graph",
    "check_model",
    "is_same_file",
    "external_data_files",
]

log = logging.getLogger(__name__)


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model, with its external data, or raise a one-line ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{path}: not a readable ONNX model ({first_line})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no graph or no opset)")
    _refuse_future_versions(path, model)
    _load_external_data(path, model)
    log.debug("loaded %s (%.0f MiB of tensors)", path, external_data.estimated_size_bytes(model) / 2**20)
    return model


def _refuse_future_versions(path: Path, model: onnx.ModelProto) -> None:
    """An IR version or default-domain opset newer than the installed onnx knows cannot be checked or run."""
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(f"{path}: IR version {model.ir_version} is newer than this onnx {onnx.__version__} knows "
                         f"(up to {onnx.IR_VERSION}); upgrade onnx and onnxruntime, or re-export with an older IR")
    newest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version > newest:
            raise ModelError(f"{path}: opset {entry.version} is newer than this onnx {onnx.__version__} knows (up to "
                             f"{newest}); upgrade onnx and onnxruntime, or re-export at opset {newest} or older")


def _load_external_data(path: Path, model: onnx.ModelProto) -> None:
    """Read the weights stored beside the model; each must lie inside the model's folder and exist.

    A model over `external_data.threshold()` bytes keeps its large main-graph initializers in their file,
    as mapped tensors (`onnxq.mapped_weights`): nothing of them is read here."""
    folder = path.resolve().parent
    external = [tensor for tensor in external_data.all_tensors(model.graph)
                if tensor.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or folder not in target.parents:
            where = "an absolute path" if Path(location).is_absolute() else "a path outside the model's folder"
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its data at {where} ('{location}'); onnxq reads "
                             "external data only from the model's folder")
        if not target.is_file():
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its data in {location}, which does not exist")
    declared = sum(_declared_bytes(tensor) for tensor in external)
    if external and external_data.estimated_size_bytes(model) + declared > external_data.threshold():
        _map_initializers(path, model, folder)
    try:
        for tensor in external:  # what is left: loaded
            if not mapped_weights.is_mapped(tensor):
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
    except (OSError, ValueError, onnx.checker.ValidationError) as err:
        raise ModelError(f"{path}: cannot read its external data ({str(err).strip().splitlines()[0]})") from None


def _declared_bytes(tensor: onnx.TensorProto) -> int:
    dtype = mapped_weights.mappable_dtype(tensor)
    return int(np.prod(tensor.dims, dtype=np.int64)) * (dtype.itemsize if dtype is not None else 1)


def _map_initializers(path: Path, model: onnx.ModelProto, folder: Path) -> None:
    """Leave the model's large external initializers in their files, as mapped tensors."""
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or _declared_bytes(tensor) < mapped_weights.MAP_FROM_BYTES:
            continue
        try:
            wrong = mapped_weights.mark_mapped(tensor, folder)
        except (OSError, ValueError) as err:
            raise ModelError(f"{path}: cannot read the external data of tensor '{tensor.name}' ({err})") from None
        if wrong is not None:
            raise ModelError(f"{path}: tensor '{tensor.name}' cannot be read: {wrong}")


def external_data_files(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """The external data files the model at `path` refers to (none when it is unreadable or self-contained)."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError):
        return ()
    locations = {entry.value for tensor in external_data.all_tensors(model.graph)
                 if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return tuple(path.parent / location for location in sorted(locations))


def is_same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when both paths name one file: same path, a symlink to it, or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *,
               keep: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Write `model` to `path` atomically; models over 2 GB get their weights in `<name>.data` beside it.

    Both files are first written into a temporary folder inside the target folder, then moved into place
    with `os.replace` (the weights first), so an interrupted save never leaves a half-written model at
    `path`. The weights file is named after the model and referred to by that bare name, so the written
    model never points outside its folder. `keep`: files the weights file must not replace (the input
    model's own external data).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelError(f"{path}: the folder {folder} does not exist")
    large = external_data.is_large(model) or mapped_weights.has_mapped(model)
    data_name = path.name + ".data"
    if large:
        read = [*keep, *{mapped_weights.mapped_file(t) for t in model.graph.initializer if mapped_weights.is_mapped(t)}]
        if any(Path(k).exists() and is_same_file(folder / data_name, k) for k in read):
            raise ModelError(f"{path}: its weights would be written to {folder / data_name}, which the input "
                             "model reads its weights from; choose another output name")
    staging = staging_name(folder / path.name)  # named first: an interruption after mkdir still removes it
    try:
        os.mkdir(staging, 0o700)
        staged_model = staging / path.name
        if large:
            log.debug("saving %s with its weights in %s", path, data_name)
            external_data.write_with_external_data(model, staged_model, data_name)
            os.replace(staging / data_name, folder / data_name)
        else:
            onnx.save_model(model, str(staged_model))
        os.replace(staged_model, path)
    except OSError as err:
        raise ModelError(f"{path}: cannot write the model ({err.strerror or err})") from None
    except ValueError as err:  # protobuf: even without its weights the model is over 2 GiB
        raise ModelError(f"{path}: cannot write the model ({str(err).strip().splitlines()[0]})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import `model` into onnx-graphsurgeon after ONNX shape inference (so tensors carry dtypes).

    A large model is inferred as a skeleton (`onnxq.external_data.skeleton`) and its constants then refer
    to `model`'s own tensors: no copy of the weights is made.
    """
    large = external_data.is_large(model)
    log.debug("shape inference%s", " on the model's skeleton (a large model)" if large else "")
    source = external_data.skeleton(model) if large else model
    try:
        inferred = onnx.shape_inference.infer_shapes(source, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as err:
        log.warning("shape inference failed, continuing without it: %s", str(err).splitlines()[0])
        inferred = source
    graph = gs.import_onnx(inferred)
    if large:
        originals = {tensor.name: tensor for tensor in model.graph.initializer}
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and isinstance(tensor._values, gs.ir.tensor.LazyValues):
                original = originals.get(tensor.name)
                if original is not None and tensor._values.tensor.data_location == onnx.TensorProto.EXTERNAL:
                    lazy = mapped_weights.MappedValues if mapped_weights.is_mapped(original) else gs.ir.tensor.LazyValues
                    tensor._values = lazy(original)
                    tensor.data_location = None  # the skeleton's: not where a rewritten value would go
    return graph


def from_graph(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export `graph`, carrying over `template`'s metadata, and write an IR version runtimes accept.

    The IR version is the lowest one that supports the model's opsets: ONNX Runtime rejects the newest
    IR versions long before it rejects the opsets they go with.
    """
    _keep_lazy_tensor_names(graph)
    saved = _refer_to_mapped_arrays(graph)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in saved:
            tensor._values = values
    if template is not None:
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(model, field, getattr(template, field))
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return model


def _refer_to_mapped_arrays(graph: gs.Graph) -> list[tuple[gs.Constant, object]]:
    """Turn each constant whose array still lies in a mapped file (a weight no rewrite changed) into a
    reference to those bytes, so exporting does not copy it; returns what to put back afterwards."""
    saved: list[tuple[gs.Constant, object]] = []
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and isinstance(tensor._values, np.ndarray):
            reference = mapped_weights.reference_for(tensor._values, tensor.name)
            if reference is not None:
                saved.append((tensor, tensor._values))
                tensor._values = mapped_weights.MappedValues(reference)
    return saved


def has_mapped_constants(graph: gs.Graph) -> bool:
    """Whether a constant of `graph` holds a mapped tensor or an array inside one (`onnxq.mapped_weights`)."""
    return any(isinstance(t, gs.Constant) and (mapped_weights.is_mapped(t._values.tensor)
                                               if isinstance(t._values, gs.ir.tensor.LazyValues)
                                               else mapped_weights.reference_for(t._values, t.name) is not None)
               for t in graph.tensors().values())


def _keep_lazy_tensor_names(graph: gs.Graph) -> None:
    """Give a renamed constant its own tensor proto: gs's export renames the proto a lazy constant wraps,
    which for a large model (see `to_graph`) belongs to the caller's model."""
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(values, gs.ir.tensor.LazyValues) and values.tensor.name != tensor.name:
            renamed = onnx.TensorProto()
            renamed.CopyFrom(values.tensor)
            renamed.name = tensor.name
            tensor._values = type(values)(renamed)


def graph_size_bytes(graph: gs.Graph) -> int:
    """The bytes of `graph`'s constants (its main graph's), without loading lazy ones."""
    return sum(int(t._values.nbytes) if isinstance(t._values, gs.ir.tensor.LazyValues) else int(t.values.nbytes)
               for t in graph.tensors().values() if isinstance(t, gs.Constant))


def export_light(graph: gs.Graph) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`from_graph(graph)` with each large constant as an external reference without data, and those
    constants' values: the graph's own arrays where it holds them (no copy), else read once from the
    tensor a lazy constant wraps (`external_data.shared_array`). For ONNX Runtime sessions on large graphs."""
    arrays: dict[str, np.ndarray] = {}
    saved: list[tuple[gs.Constant, object]] = []
    try:
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Constant):
                continue
            values = tensor._values
            if isinstance(values, gs.ir.tensor.LazyValues):
                if not external_data.moves_out(values.tensor):
                    continue
                array = external_data.shared_array(values.tensor)
            elif isinstance(values, np.ndarray) and values.nbytes >= external_data.MIN_EXTERNAL_TENSOR_BYTES \
                    and values.dtype != object:
                array = values
            else:
                continue
            reference = onnx.TensorProto(name=tensor.name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                         dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
            entry = reference.external_data.add()
            entry.key, entry.value = "location", external_data.SESSION_DATA_NAME
            saved.append((tensor, values))
            tensor._values = gs.ir.tensor.LazyValues(reference)
            arrays[tensor.name] = array
        return from_graph(graph), arrays
    finally:
        for tensor, values in saved:
            tensor._values = values


# From this many bytes of tensors a model is checked as a skeleton: the in-memory checker serializes the
# model and parses it back (a 0.52 GiB INT8 model: +0.56 GiB peak and 3 s, against nothing and 0.3 s).
_CHECK_SKELETON_FROM_BYTES = 64 * 2**20


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    """Run the full ONNX checker (with shape inference), raising a one-line ModelError.

    A large model (or one over 64 MiB) is checked from a file holding its skeleton: the checker sees every
    node, type and shape, and that each large tensor's external data file exists (an empty one), without
    its weights; that each of those tensors holds as many bytes as its shape says is checked here.
    """
    try:
        if external_data.estimated_size_bytes(model) > min(_CHECK_SKELETON_FROM_BYTES, external_data.threshold()):
            log.debug("checking %s from a file holding its skeleton", what)
            wrong = external_data.tensor_with_wrong_size(model)
            if wrong is not None:
                raise ModelError(f"{what} fails the ONNX checker: tensor '{wrong}' holds a different number of "
                                 "bytes than its shape needs")
            with tempfile.TemporaryDirectory(prefix="onnxq-check-") as tmp:
                staged = Path(tmp) / "model.onnx"
                (Path(tmp) / "model.onnx.data").touch()
                onnx.save_model(external_data.skeleton(model, "model.onnx.data"), str(staged))
                onnx.checker.check_model(str(staged), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ModelError(f"{what} fails the ONNX checker: {str(err).strip().splitlines()[0]}") from None
