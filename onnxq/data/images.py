"""Image folders as calibration data: decode, resize, centre-crop and normalise each picture.

The defaults follow the usual ImageNet evaluation recipe: shorter side to 256/224 of the crop, centre
crop, `(x - mean) / std` with the ImageNet mean and std in 0..255 pixel units, RGB, NCHW.
"""

from __future__ import annotations

import contextlib
import enum
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
import numpy as np
from PIL import Image

from onnxq.errors import CalibrationError, ConfigError, first_line
from onnxq.data.signature import Feed, InputSpec, ModelSignature, SignedSource, window_text

__all__ = [
    "IMAGE_SUFFIXES",
    "ColorOrder",
    "ImageFolderSource",
    "ImagePreprocess",
    "ImagesWindow",
    "Layout",
    "load_image",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)
_TOO_LARGE = (Image.DecompressionBombWarning, Image.DecompressionBombError)


class Layout(enum.Enum):
    """Where the channel axis of an image input is."""

    AUTO = "auto"
    NCHW = "nchw"
    NHWC = "nhwc"


class ColorOrder(enum.Enum):
    """The channel order the model was trained with."""

    RGB = "rgb"
    BGR = "bgr"


def _is_positive_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True)
class ImagePreprocess:
    """How a picture becomes one sample.

    Attributes:
        size: (height, width) of the centre crop; None takes them from the model's input shape.
        resize: the shorter side after resizing, before the crop; None means round(max(H, W) * 256 / 224).
        mean: per-channel mean in 0..255 pixel units, RGB order (grayscale inputs use the average).
        std: per-channel standard deviation in 0..255 pixel units, RGB order (grayscale: the average).
        layout: channel position; AUTO finds a channel dim of size 3 (or 1) at axis 1 (NCHW) or last (NHWC).
        color: channel order fed to the model.
    """

    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    layout: Layout = Layout.AUTO
    color: ColorOrder = ColorOrder.RGB

    def __post_init__(self) -> None:
        if self.size is not None and (len(self.size) != 2 or not all(_is_positive_int(v) for v in self.size)):
            raise ConfigError(f"--image-size must be two positive integers HxW, got {self.size}")
        if self.resize is not None and not _is_positive_int(self.resize):
            raise ConfigError(f"--resize must be a positive integer, got {self.resize}")
        if self.size is not None and self.resize is not None and self.resize < max(self.size):
            raise ConfigError(f"--resize {self.resize} is smaller than the {self.size[0]}x{self.size[1]} crop; "
                              f"it must be at least {max(self.size)}")
        for option, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) != 3 or not all(_is_number(v) for v in values):
                raise ConfigError(f"{option} needs three finite numbers (R, G, B) in 0..255 pixel units, "
                                  f"got {values}")
        if any(v == 0 for v in self.std):
            raise ConfigError(f"--std values must be non-zero, got {self.std}")
        if not isinstance(self.layout, Layout):
            raise ConfigError(f"--layout must be one of {', '.join(m.value for m in Layout)}, got {self.layout!r}")
        if not isinstance(self.color, ColorOrder):
            raise ConfigError(f"--color must be one of {', '.join(m.value for m in ColorOrder)}, got {self.color!r}")

    def resize_for(self, size_hw: tuple[int, int]) -> int:
        """The shorter side to resize to before cropping `size_hw`."""
        return self.resize if self.resize is not None else round(max(size_hw) * 256 / 224)


def _resize_shorter_side(picture: Image.Image, shorter_side: int) -> Image.Image:
    width, height = picture.size
    if width <= height:
        new_size = (shorter_side, max(1, round(height * shorter_side / width)))
    else:
        new_size = (max(1, round(width * shorter_side / height)), shorter_side)
    if new_size == picture.size:
        return picture
    return picture.resize(new_size, Image.Resampling.BILINEAR)


def _centre_crop(picture: Image.Image, height: int, width: int) -> Image.Image:
    left = (picture.width - width) // 2
    top = (picture.height - height) // 2
    return picture.crop((left, top, left + width, top + height))


@contextlib.contextmanager
def _open_image(path: str | Path, failure: str) -> Iterator[Image.Image]:
    """`Image.open(path)`, with every decoding failure in the block a one-line CalibrationError starting
    "{path}: {failure}". An image above Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`,
    89.5 million pixels by default) is refused before its pixels are decoded: Pillow itself only warns up to
    twice that size, and would decode it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except _TOO_LARGE as err:
        raise CalibrationError(f"{path}: the image is too large to decode safely: {first_line(err)}") from err
    except _DECODE_ERRORS as err:
        raise CalibrationError(f"{path}: {failure}: {first_line(err)}") from err


def load_image(path: str | Path, preprocess: ImagePreprocess, size_hw: tuple[int, int], layout: Layout,
               channels: int = 3) -> np.ndarray:
    """Decode and preprocess one picture into one float32 sample (no batch axis).

    Args:
        path: the image file.
        preprocess: resize, normalisation and colour options (`size` and `layout` there are ignored).
        size_hw: (height, width) of the centre crop.
        layout: NCHW gives (C, H, W), NHWC gives (H, W, C).
        channels: 3 for RGB/BGR, 1 for grayscale.

    Raises:
        CalibrationError: the file cannot be decoded, or has more pixels than `PIL.Image.MAX_IMAGE_PIXELS`.
        ConfigError: `layout` is AUTO or `channels` is not 1 or 3.
    """
    if layout is Layout.AUTO or channels not in (1, 3):
        raise ConfigError(f"load_image needs layout nchw or nhwc and 1 or 3 channels, got {layout.value}, {channels}")
    height, width = size_hw
    with _open_image(path, "cannot decode the image") as image:
        picture = image.convert("L" if channels == 1 else "RGB")
    if min(picture.size) == 0:
        raise CalibrationError(f"{path}: the image is empty ({picture.width}x{picture.height})")
    picture = _centre_crop(_resize_shorter_side(picture, preprocess.resize_for(size_hw)), height, width)
    pixels = np.asarray(picture, dtype=np.float32).reshape(height, width, channels)
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    if channels == 1:
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    pixels = (pixels - mean) / std
    if preprocess.color is ColorOrder.BGR and channels == 3:
        pixels = pixels[:, :, ::-1]
    if layout is Layout.NCHW:
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


@dataclass(frozen=True)
class _ImageInput:
    """The model input an image folder feeds, with everything `load_image` needs."""

    name: str
    dtype: np.dtype
    size_hw: tuple[int, int]
    layout: Layout
    channels: int


def _layout_of(location: str, spec: InputSpec, requested: Layout) -> Layout:
    if requested is not Layout.AUTO:
        return requested
    channels_first = spec.shape[1] in (1, 3)
    channels_last = spec.shape[3] in (1, 3)
    if channels_first != channels_last:
        return Layout.NCHW if channels_first else Layout.NHWC
    raise CalibrationError(f"{location}: cannot tell whether input '{spec.name}' {spec.shape_text()} is NCHW or "
                           "NHWC; pass --layout nchw or --layout nhwc")


def _crop_size(location: str, spec: InputSpec, model_hw: tuple[int | None, int | None],
               requested: tuple[int, int] | None) -> tuple[int, int]:
    if requested is None:
        if None in model_hw:
            raise CalibrationError(f"{location}: input '{spec.name}' {spec.shape_text()} has a symbolic height or "
                                   "width; pass --image-size HxW")
        return (model_hw[0], model_hw[1])
    for given, fixed in zip(requested, model_hw):
        if fixed is not None and given != fixed:
            expected = "x".join("?" if dim is None else str(dim) for dim in model_hw)
            raise CalibrationError(f"{location}: --image-size {requested[0]}x{requested[1]} does not fit input "
                                   f"'{spec.name}' {spec.shape_text()}, which takes {expected} images")
    return (requested[0], requested[1])


def _image_input(location: str, specs: Sequence[InputSpec], preprocess: ImagePreprocess) -> _ImageInput:
    """Find the one 4-D float input an image folder can feed, and its crop size, layout and channels."""
    if len(specs) != 1 or len(specs[0].shape) != 4 or not np.issubdtype(specs[0].dtype, np.floating):
        inputs = ", ".join(spec.describe() for spec in specs) or "none"
        raise CalibrationError(f"{location}: an image folder can only feed a model with a single 4-D float input; "
                               f"the model's inputs are {inputs}. Save the data as an .npz keyed by input name")
    spec = specs[0]
    layout = _layout_of(location, spec, preprocess.layout)
    channel_axis, hw_axes = (1, (2, 3)) if layout is Layout.NCHW else (3, (1, 2))
    channels = spec.shape[channel_axis] or 3
    if channels not in (1, 3):
        raise CalibrationError(f"{location}: input '{spec.name}' {spec.shape_text()} has {channels} channels in "
                               f"{layout.value.upper()} layout; images give 3 (RGB) or 1 (grayscale)")
    size_hw = _crop_size(location, spec, (spec.shape[hw_axes[0]], spec.shape[hw_axes[1]]), preprocess.size)
    if preprocess.resize is not None and preprocess.resize < max(size_hw):
        raise CalibrationError(f"{location}: --resize {preprocess.resize} is smaller than the {size_hw[0]}x"
                               f"{size_hw[1]} crop input '{spec.name}' needs")
    return _ImageInput(spec.name, spec.dtype, size_hw, layout, channels)


def _check_image_header(path: Path) -> None:
    with _open_image(path, "not a readable image") as image:
        width, height = image.size
    if width == 0 or height == 0:
        raise CalibrationError(f"{path}: the image is empty ({width}x{height})")


class ImageFolderSource(SignedSource):
    """One sample per image file, preprocessed with `load_image`; every file's header is checked up front."""

    def __init__(self, location: str, files: Sequence[Path], signature: ModelSignature | Sequence[InputSpec],
                 preprocess: ImagePreprocess) -> None:
        if not files:
            raise CalibrationError(f"{location}: no images ({', '.join(IMAGE_SUFFIXES)})")
        self._location = location
        self._files = tuple(files)
        self._preprocess = preprocess
        self._signature = ModelSignature.of(signature)
        self._input = _image_input(location, self._signature.inputs, preprocess)
        for path in self._files:
            _check_image_header(path)

    def describe(self) -> str:
        """E.g. "64 images in photos/ (shorter side 256, centre crop 224x224, nchw, rgb)"."""
        target = self._input
        height, width = target.size_hw
        color = "grayscale" if target.channels == 1 else self._preprocess.color.value
        return (f"{len(self._files)} images in {self._location} (shorter side "
                f"{self._preprocess.resize_for(target.size_hw)}, centre crop {height}x{width}, "
                f"{target.layout.value}, {color})")

    def num_samples(self) -> int:
        """One sample per image."""
        return len(self._files)

    def window(self, samples: range, shard: object, of: str | None = None) -> ImagesWindow:
        """Images `samples` of the sorted file list, as shard `shard` (see onnxq.data.shards)."""
        return ImagesWindow(self, samples, shard, of)

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """Batches of preprocessed images in file-name order; see `CalibSource.batches`."""
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        return self._batches(batch_size)

    def _batches(self, batch_size: int) -> Iterator[Feed]:
        target = self._input
        for start in range(0, len(self._files), batch_size):
            samples = [load_image(path, self._preprocess, target.size_hw, target.layout, target.channels)
                       for path in self._files[start:start + batch_size]]
            yield {target.name: np.stack(samples).astype(target.dtype, copy=False)}


class ImagesWindow(SignedSource):
    """Images `samples` of an `ImageFolderSource` (a slice of its sorted file list, the rest never decoded):
    a shard, `shard` says which."""

    def __init__(self, source: ImageFolderSource, samples: range, shard: object, of: str | None = None) -> None:
        self._whole, self._window, self.shard, self._of = source, samples, shard, of
        self._signature = source.signature
        self._part = ImageFolderSource(source._location, source._files[samples.start:samples.stop], source.signature,
                                       source._preprocess)

    def describe(self) -> str:
        return f"shard {self.shard} ({window_text(self._window)}) of {self._of or self._whole.describe()}"

    def num_samples(self) -> int:
        return len(self._window)

    def batches(self, batch_size: int) -> Iterator[Feed]:
        return self._part.batches(batch_size)
