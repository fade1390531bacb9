"""Loading, saving and the protobuf <-> graph boundary."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import models
import onnxq.external_data
import onnxq.io
from onnxq.runtime.session import open_session
from onnxq.errors import ModelError


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch) -> None:
    """Above the threshold (2 GB in real use) weights go to `<name>.data` beside the model."""
    monkeypatch.setattr(onnxq.external_data, "LARGE_MODEL_BYTES", 1000)
    model = models.BUILDERS["residual_cnn"]()
    target = tmp_path / "big.onnx"
    onnxq.io.save_model(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert target.stat().st_size < (tmp_path / "big.onnx.data").stat().st_size
    reloaded = onnxq.io.load_model(target)
    feeds = models.random_feeds(model, batch=2)
    with open_session(model) as a, open_session(reloaded) as b:
        np.testing.assert_array_equal(a.run(feeds)["logits"], b.run(feeds)["logits"])


def test_save_replaces_atomically_and_leaves_no_staging_files(tmp_path) -> None:
    model = models.BUILDERS["gemm_mlp"]()
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    onnxq.io.save_model(model, target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert onnx.load(str(target)).graph.node[0].name == model.graph.node[0].name


def test_written_ir_version_is_accepted_by_onnx_runtime() -> None:
    model = models.BUILDERS["gemm_mlp"]()
    model.ir_version = onnx.IR_VERSION  # what onnx writes by default, newer than ONNX Runtime accepts
    exported = onnxq.io.from_graph(onnxq.io.to_graph(model), model)
    assert exported.ir_version == onnx.helper.find_min_ir_version_for(list(exported.opset_import))
    with open_session(exported) as session:
        assert session.run(models.random_feeds(model))["logits"].shape == (2, 10)


def test_metadata_survives_the_graph_round_trip() -> None:
    model = models.BUILDERS["gemm_mlp"]()
    onnx.helper.set_model_props(model, {"author": "onnxq tests", "licence": "Apache-2.0"})
    model.doc_string, model.model_version = "a doc", 7
    exported = onnxq.io.from_graph(onnxq.io.to_graph(model), model)
    assert {p.key: p.value for p in exported.metadata_props} == {"author": "onnxq tests", "licence": "Apache-2.0"}
    assert (exported.doc_string, exported.model_version) == ("a doc", 7)


def test_same_file_detection_sees_links(tmp_path) -> None:
    original = tmp_path / "a.onnx"
    original.write_bytes(b"x")
    (tmp_path / "sym.onnx").symlink_to(original)
    (tmp_path / "hard.onnx").hardlink_to(original)
    for alias in ("sym.onnx", "hard.onnx", "../" + tmp_path.name + "/a.onnx"):
        assert onnxq.io.is_same_file(tmp_path / alias, original), alias
    assert not onnxq.io.is_same_file(tmp_path / "other.onnx", original)


def test_checker_failure_is_one_line() -> None:
    model = models.BUILDERS["gemm_mlp"]()
    model.graph.node[0].input[0] = "missing_tensor"
    with pytest.raises(ModelError) as info:
        onnxq.io.check_model(model)
    assert "\n" not in str(info.value) and "missing_tensor" in str(info.value)
