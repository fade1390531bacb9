"""Calibration data sources, on the real models, photos and text lines committed under models/."""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxq.data.signature import ModelSignature
from onnxq.data.arrays import rebatch as _rebatch
from onnxq.data.sources import CalibSource, InputSpec, input_specs, open_source
from onnxq.data.images import ColorOrder, ImagePreprocess, Layout, load_image
from onnxq.errors import CalibrationError, ConfigError, ModelError
from tests.support.paths import MODELS

PHOTOS = MODELS / "data" / "photos" / "calib"
TEXTLINES = MODELS / "data" / "textlines" / "ppocr_cls_calib.npz"
ASTRONAUT = PHOTOS / "000_astronaut.jpg"
F32 = np.dtype(np.float32)
EFFNET = (InputSpec("input", F32, (None, 3, 224, 224)),)
PPOCR = (InputSpec("x", F32, (None, 3, None, None)),)
AUDIO = (InputSpec("audio", F32, (None, 16)), InputSpec("sr", np.dtype(np.int64), ()))
PAIR = (InputSpec("a", F32, (None, 2)), InputSpec("b", F32, (None, 3)))


@pytest.fixture(scope="module")
def textlines() -> np.ndarray:
    with np.load(TEXTLINES) as archive:
        return archive["x"]


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record the keyword arguments of every np.load call."""
    calls: list[dict] = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    return calls


def collect(source: CalibSource, batch_size: int, name: str) -> tuple[list[int], np.ndarray]:
    batches = list(source.batches(batch_size))
    return [batch[name].shape[0] for batch in batches], np.concatenate([batch[name] for batch in batches])


def reference_photo(path: Path, shorter: int, crop_hw: tuple[int, int], mean, std, mode: str = "RGB") -> np.ndarray:
    """Hand-written preprocessing: bilinear resize of the shorter side, centre crop, normalise; HWC."""
    picture = Image.open(path).convert(mode)
    scale = shorter / min(picture.size)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.Resampling.BILINEAR)
    top, left = (picture.height - crop_hw[0]) // 2, (picture.width - crop_hw[1]) // 2
    pixels = np.asarray(picture, dtype=np.float32).reshape(picture.height, picture.width, -1)
    pixels = pixels[top:top + crop_hw[0], left:left + crop_hw[1]]
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def write_loader(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\n\n" + body)
    return script


def test_input_specs_of_real_models() -> None:
    assert input_specs(onnx.load(MODELS / "efficientnet_lite0.onnx")) == EFFNET
    assert input_specs(onnx.load(MODELS / "ppocr_mobile_v2_cls.onnx")) == PPOCR
    silero = {spec.name: spec for spec in input_specs(onnx.load(MODELS / "silero_vad.onnx"))}
    assert silero["sr"] == InputSpec("sr", np.dtype(np.int64), ())
    assert silero["state"].shape == (2, None, 128)


def test_input_specs_skip_initializers_and_reject_shapeless_inputs() -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 2]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", inputs, [output], [weight])
    assert input_specs(helper.make_model(graph)) == (InputSpec("x", np.dtype(np.float16), (None, 2)),)
    inputs[0] = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", inputs, [output], [weight])
    with pytest.raises(ModelError, match="'x' has no shape"):
        input_specs(helper.make_model(graph))


@pytest.mark.parametrize(("batch_size", "sizes"), [(1, [1] * 64), (5, [5] * 12 + [4]), (64, [64]), (100, [64])])
def test_npz_rebatching_keeps_every_sample_in_order(textlines: np.ndarray, batch_size: int, sizes: list[int]) -> None:
    source = open_source(TEXTLINES, PPOCR)
    assert isinstance(source, CalibSource)
    assert source.num_samples() == 64
    assert "64 samples" in source.describe() and str(TEXTLINES) in source.describe()
    got_sizes, samples = collect(source, batch_size, "x")
    assert got_sizes == sizes
    np.testing.assert_array_equal(samples, textlines)


def test_npy_is_memory_mapped_and_never_unpickled(tmp_path: Path, textlines: np.ndarray, load_calls: list) -> None:
    np.save(tmp_path / "lines.npy", textlines)
    source = open_source(tmp_path / "lines.npy", PPOCR)
    assert load_calls == []  # opening reads only the header
    batches = list(source.batches(24))
    assert [type(batch["x"]) for batch in batches] == [np.ndarray] * 3  # copies, not views of the memory map
    np.testing.assert_array_equal(np.concatenate([batch["x"] for batch in batches]), textlines)
    assert load_calls == [{"mmap_mode": "r", "allow_pickle": False}]


def test_directory_of_npz_files_is_streamed_one_file_at_a_time(tmp_path: Path, textlines: np.ndarray,
                                                               load_calls: list) -> None:
    for name, part in [("part0.npz", textlines[:10]), ("part1.npz", textlines[10:40]), ("part2.npz", textlines[40:])]:
        np.savez(tmp_path / name, x=part)
    (tmp_path / "notes.txt").write_text("not data")
    source = open_source(tmp_path, PPOCR)
    assert source.num_samples() == 64 and "3 array files" in source.describe()
    batches = source.batches(16)
    first = next(batches)
    assert len(load_calls) == 2  # 16 samples need part0 (10) and part1 only
    rest = list(batches)
    assert len(load_calls) == 3 and all(call["allow_pickle"] is False for call in load_calls)
    assert [batch["x"].shape for batch in [first, *rest]] == [(16, 3, 48, 192)] * 4
    np.testing.assert_array_equal(np.concatenate([first["x"]] + [batch["x"] for batch in rest]), textlines)


def test_directory_of_npy_files_in_name_order(tmp_path: Path, textlines: np.ndarray) -> None:
    np.save(tmp_path / "b.npy", textlines[30:])
    np.save(tmp_path / "a.npy", textlines[:30])
    sizes, samples = collect(open_source(tmp_path, PPOCR), 20, "x")
    assert sizes == [20, 20, 20, 4]
    np.testing.assert_array_equal(samples, textlines)


def test_rebatching_keeps_no_view_of_a_finished_file() -> None:
    files = [np.full((3, 1), index, np.float32) for index in range(3)]
    refs = [weakref.ref(array) for array in files]
    feeds = (("file", {"x": files.pop(0)}) for _ in range(3))
    batches = _rebatch(feeds, ModelSignature((InputSpec("x", F32, (None, 1)),)), 4)
    assert next(batches)["x"][:, 0].tolist() == [0, 0, 0, 1]
    assert refs[0]() is None  # the leftover samples of file 0 were copied, so file 0 could be freed
    assert [batch["x"][:, 0].tolist() for batch in batches] == [[1, 1, 2, 2], [2]]


def test_rank0_input_is_passed_with_every_batch(tmp_path: Path) -> None:
    audio = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    np.savez(tmp_path / "a.npz", audio=audio[:3], sr=np.array(16000))
    np.savez(tmp_path / "b.npz", audio=audio[3:], sr=np.array(16000))
    batches = list(open_source(tmp_path, AUDIO).batches(2))
    assert [batch["audio"].shape[0] for batch in batches] == [2, 2, 2, 1]
    assert all(batch["sr"].shape == () and batch["sr"] == 16000 for batch in batches)
    np.testing.assert_array_equal(np.concatenate([batch["audio"] for batch in batches]), audio)
    np.savez(tmp_path / "c.npz", audio=audio[:1], sr=np.array(8000))
    with pytest.raises(CalibrationError, match=r"c\.npz: rank-0 input 'sr' is 8000"):
        list(open_source(tmp_path, AUDIO).batches(2))


def test_symbolic_dims_are_free(tmp_path: Path) -> None:
    np.savez(tmp_path / "small.npz", x=np.zeros((2, 3, 32, 100), np.float32))
    assert [b["x"].shape for b in open_source(tmp_path / "small.npz", PPOCR).batches(8)] == [(2, 3, 32, 100)]


@pytest.mark.parametrize(("arrays", "specs", "fragments"), [
    ({"audio": np.zeros((2, 16), np.float32)}, AUDIO, ["no array for input 'sr' () int64"]),
    ({"x": np.zeros((2, 3, 4, 4), np.float32), "y": np.zeros(2)}, PPOCR,
     ["array 'y' is not a model input", "inputs are 'x' (N, 3, ?, ?) float32"]),
    ({"x": np.zeros((2, 3, 4, 4))}, PPOCR, ["input 'x' has dtype float64", "convert with .astype(np.float32)"]),
    ({"x": np.zeros((3, 48, 192), np.float32)}, PPOCR, ["input 'x' has shape (3, 48, 192) (rank 3)", "np.newaxis"]),
    ({"input": np.zeros((4, 3, 224, 225), np.float32)}, EFFNET,
     ["input 'input' has shape (4, 3, 224, 225); the model expects (N, 3, 224, 224)"]),
    ({"input": np.zeros((4, 1, 224, 224), np.float32)}, EFFNET, ["input 'input' has shape (4, 1, 224, 224);"]),
    ({"a": np.zeros((4, 2), np.float32), "b": np.zeros((5, 3), np.float32)}, PAIR, ["'a' has 4, 'b' has 5"]),
    ({"x": np.zeros((0, 3, 4, 4), np.float32)}, PPOCR, ["input 'x' holds no samples"]),
])
def test_npz_validation_errors_name_file_and_tensor(tmp_path: Path, arrays: dict, specs: tuple,
                                                    fragments: list[str]) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationError) as caught:
        open_source(tmp_path / "bad.npz", specs)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'bad.npz'}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_bad_file_in_directory_fails_before_any_data_is_loaded(tmp_path: Path, load_calls: list) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 3, 8, 8), np.float16))
    with pytest.raises(CalibrationError, match=r"b\.npz: input 'x' has dtype float16"):
        open_source(tmp_path, PPOCR)
    assert load_calls == []


@pytest.mark.parametrize("file_name", ["objects.npy", "objects.npz"])
def test_object_arrays_are_refused_without_unpickling(tmp_path: Path, file_name: str, load_calls: list) -> None:
    objects = np.empty((2, 3, 4, 4), dtype=object)
    if file_name.endswith(".npy"):
        np.save(tmp_path / file_name, objects, allow_pickle=True)
    else:
        np.savez(tmp_path / file_name, x=objects)
    with pytest.raises(CalibrationError, match=rf"{file_name}: input 'x' holds Python objects .* never unpickles"):
        open_source(tmp_path / file_name, PPOCR)
    assert load_calls == []


@pytest.mark.parametrize("file_name", ["broken.npz", "broken.npy"])
def test_corrupt_array_files(tmp_path: Path, file_name: str) -> None:
    (tmp_path / file_name).write_bytes(b"this is not numpy data at all")
    with pytest.raises(CalibrationError, match=rf"{file_name}: not a readable"):
        open_source(tmp_path / file_name, PPOCR)


def test_npy_needs_a_single_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "audio.npy", np.zeros((2, 16), np.float32))
    with pytest.raises(CalibrationError, match=r"audio\.npy: .* the model has 2 inputs .*use an \.npz"):
        open_source(tmp_path / "audio.npy", AUDIO)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="missing.npz: no such file or directory"):
        open_source(tmp_path / "missing.npz", PPOCR)
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(CalibrationError, match=r"data\.csv: unsupported calibration data"):
        open_source(tmp_path / "data.csv", PPOCR)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="empty: the directory holds no calibration files"):
        open_source(tmp_path / "empty", PPOCR)
    np.save(tmp_path / "lines.npy", np.zeros((1, 3, 8, 8), np.float32))
    shutil.copy(ASTRONAUT, tmp_path / "photo.jpg")
    with pytest.raises(CalibrationError, match=r"mixes array files \(lines\.npy, ...\) and images \(photo\.jpg"):
        open_source(tmp_path, PPOCR)


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="--batch-size"):
        open_source(TEXTLINES, PPOCR).batches(0)


@pytest.mark.parametrize("layout", [Layout.NCHW, Layout.NHWC])
@pytest.mark.parametrize("color", [ColorOrder.RGB, ColorOrder.BGR])
def test_load_image_matches_a_hand_written_pipeline(layout: Layout, color: ColorOrder) -> None:
    mean, std = (10.0, 100.0, 200.0), (50.0, 60.0, 70.0)
    preprocess = ImagePreprocess(resize=220, mean=mean, std=std, layout=layout, color=color)
    sample = load_image(ASTRONAUT, preprocess, (200, 180), layout)
    expected = reference_photo(ASTRONAUT, 220, (200, 180), mean, std)
    expected = expected[:, :, ::-1] if color is ColorOrder.BGR else expected
    expected = expected.transpose(2, 0, 1) if layout is Layout.NCHW else expected
    assert sample.dtype == np.float32 and sample.shape == expected.shape
    np.testing.assert_allclose(sample, expected, rtol=1e-6, atol=1e-5)


def test_image_folder_defaults_come_from_the_model_shape() -> None:
    source = open_source(PHOTOS, EFFNET)
    assert source.num_samples() == 64
    assert source.describe().startswith(f"64 images in {PHOTOS} (shorter side 256, centre crop 224x224, nchw")
    sizes, samples = collect(source, 24, "input")
    assert sizes == [24, 24, 16] and samples.shape == (64, 3, 224, 224) and samples.dtype == np.float32
    files = sorted(PHOTOS.glob("*.jpg"))
    for index in (0, 63):
        expected = reference_photo(files[index], 256, (224, 224), ImagePreprocess.mean, ImagePreprocess.std)
        np.testing.assert_allclose(samples[index], expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-5)


def test_image_folder_nhwc_float16_and_grayscale(tmp_path: Path) -> None:
    for name in ("a.JPG", "b.jpeg"):
        shutil.copy(ASTRONAUT, tmp_path / name)
    nhwc = (InputSpec("image", np.dtype(np.float16), (None, 64, 48, 3)),)
    batch = next(open_source(tmp_path, nhwc).batches(8))["image"]
    assert batch.shape == (2, 64, 48, 3) and batch.dtype == np.float16
    gray = (InputSpec("image", F32, (None, 1, 32, 32)),)
    sample = next(open_source(tmp_path, gray).batches(1))["image"][0]
    mean, std = np.mean(ImagePreprocess.mean), np.mean(ImagePreprocess.std)
    expected = reference_photo(ASTRONAUT, round(32 * 256 / 224), (32, 32), mean, std, mode="L")
    np.testing.assert_allclose(sample, expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-4)


def test_symbolic_image_size_needs_image_size_option() -> None:
    with pytest.raises(CalibrationError, match=r"calib: input 'x' \(N, 3, \?, \?\) .* pass --image-size HxW"):
        open_source(PHOTOS, PPOCR)
    source = open_source(PHOTOS, PPOCR, ImagePreprocess(size=(48, 192)))
    assert next(source.batches(4))["x"].shape == (4, 3, 48, 192)
    with pytest.raises(CalibrationError, match="--image-size 200x200 does not fit input 'input'.*224x224"):
        open_source(PHOTOS, EFFNET, ImagePreprocess(size=(200, 200)))


@pytest.mark.parametrize(("specs", "preprocess", "fragment"), [
    (AUDIO, ImagePreprocess(), "inputs are 'audio' (N, 16) float32, 'sr' () int64"),
    ((InputSpec("x", np.dtype(np.int64), (None, 3, 8, 8)),), ImagePreprocess(), "'x' (N, 3, 8, 8) int64"),
    ((InputSpec("x", F32, (None, 5, 8, 8)),), ImagePreprocess(layout=Layout.NCHW), "'x' (N, 5, 8, 8) has 5 channels"),
    ((InputSpec("x", F32, (None, 3, 8, 3)),), ImagePreprocess(), "pass --layout nchw or --layout nhwc"),
    ((InputSpec("x", F32, (None, 3, 224, 224)),), ImagePreprocess(resize=100), "--resize 100 is smaller"),
])
def test_image_folder_needs_one_4d_float_image_input(specs: tuple, preprocess: ImagePreprocess, fragment: str) -> None:
    with pytest.raises(CalibrationError) as caught:
        open_source(PHOTOS, specs, preprocess)
    assert str(caught.value).startswith(f"{PHOTOS}: ") and fragment in str(caught.value)


def test_unreadable_images_name_the_file(tmp_path: Path) -> None:
    shutil.copy(ASTRONAUT, tmp_path / "good.jpg")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationError, match=r"bad\.png: not a readable image"):
        open_source(tmp_path, EFFNET)
    (tmp_path / "bad.png").unlink()
    (tmp_path / "truncated.jpg").write_bytes(ASTRONAUT.read_bytes()[:2000])
    source = open_source(tmp_path, EFFNET)  # the header is intact; decoding fails later
    with pytest.raises(CalibrationError, match=r"truncated\.jpg: cannot decode the image"):
        list(source.batches(2))


@pytest.mark.parametrize(("options", "fragment"), [
    ({"size": (0, 224)}, "--image-size"),
    ({"size": (224,)}, "--image-size"),
    ({"resize": -1}, "--resize"),
    ({"size": (224, 224), "resize": 200}, "--resize 200 is smaller"),
    ({"std": (1.0, 0.0, 1.0)}, "--std values must be non-zero"),
    ({"mean": (1.0, 2.0)}, "--mean needs three"),
    ({"layout": "nchw"}, "--layout"),
])
def test_image_preprocess_options_are_validated(options: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ImagePreprocess(**options)


def test_load_image_needs_a_concrete_layout() -> None:
    with pytest.raises(ConfigError, match="nchw or nhwc"):
        load_image(ASTRONAUT, ImagePreprocess(), (224, 224), Layout.AUTO)


def test_script_loader_default_function_is_rebatched(tmp_path: Path) -> None:
    script = write_loader(tmp_path, (
        "def load_data():\n"
        "    for start, count in [(0, 3), (3, 5), (8, 2)]:\n"
        "        values = np.arange(start * 12, (start + count) * 12, dtype=np.float32)\n"
        "        yield {'x': values.reshape(count, 3, 2, 2)}\n"))
    source = open_source(script, PPOCR)
    assert source.num_samples() is None and source.describe() == f"feeds from {script}:load_data"
    expected = np.arange(120, dtype=np.float32).reshape(10, 3, 2, 2)
    for _ in range(2):  # every call of batches() runs the loader again
        sizes, samples = collect(source, 4, "x")
        assert sizes == [4, 4, 2]
        np.testing.assert_array_equal(samples, expected)


def test_script_loader_named_function_returning_a_list(tmp_path: Path) -> None:
    script = write_loader(tmp_path, (
        "def make():\n"
        "    return [{'audio': np.ones((3, 16), np.float32), 'sr': np.int64(16000)}] * 2\n"))
    batches = list(open_source(f"{script}:make", AUDIO).batches(4))
    assert [batch["audio"].shape for batch in batches] == [(4, 16), (2, 16)]
    assert all(batch["sr"] == 16000 and batch["sr"].dtype == np.int64 for batch in batches)


@pytest.mark.parametrize(("body", "function", "fragment"), [
    ("def other():\n    return []\n", "", "loader.py: no function 'load_data'"),
    ("load_data = 3\n", "", "loader.py: 'load_data' is a int, not a function"),
    ("raise RuntimeError('boom')\n", "", "importing the data loader failed: RuntimeError: boom"),
    ("def load_data():\n    return None\n", "", "loader.py:load_data returned NoneType"),
    ("def load_data():\n    return []\n", "", "loader.py:load_data produced no feeds"),
    ("def load_data():\n    yield 5\n", "", "loader.py:load_data feed 0 is a int, not a dict"),
    ("def load_data(path):\n    return []\n", "", "loader.py:load_data raised TypeError"),
    ("def feeds():\n    yield {'x': [[1.0]]}\n", ":feeds", "feed 0: input 'x' is a list, not a numpy array"),
    ("def load_data():\n    yield {'x': np.zeros((1, 3, 2, 2), np.float32)}\n    raise ValueError('disk')\n", "",
     "loader.py:load_data raised ValueError after 1 feeds: disk"),
    ("", ":1abc", "'1abc' is not a Python function name"),
])
def test_script_loader_errors(tmp_path: Path, body: str, function: str, fragment: str) -> None:
    script = write_loader(tmp_path, body)
    with pytest.raises(CalibrationError) as caught:
        list(open_source(f"{script}{function}", PPOCR).batches(2))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_missing_script() -> None:
    with pytest.raises(CalibrationError, match="nowhere.py: no such data-loader script"):
        open_source("nowhere.py:load_data", PPOCR)


def test_script_feeds_are_checked_before_more_data_is_asked_for(tmp_path: Path) -> None:
    script = write_loader(tmp_path, (
        "def load_data():\n"
        "    yield {'input': np.zeros((1, 3, 224, 225), np.float32)}\n"
        "    raise RuntimeError('should not be reached')\n"))
    batches = open_source(script, EFFNET).batches(64)
    with pytest.raises(CalibrationError) as caught:
        next(batches)
    assert str(caught.value) == (f"{script}:load_data feed 0: input 'input' has shape (1, 3, 224, 225); "
                                 "the model expects (N, 3, 224, 224)")
