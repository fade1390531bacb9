"""Reusable option groups. Each collapses its raw strings into one typed onnxq object, here and only here.

The library modules that need onnx or ONNX Runtime are imported when a command runs, not when its options
are declared, so that `--help` does not load them; the few choices and defaults the declarations show are
written out here (tests/cli/test_stdout_and_usage.py checks them against the library's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from onnxq.errors import ConfigError, ModelError
from onnxq.options import CalibConfig, CalibMethod, HighPrecision, Selection, parse_enum

if TYPE_CHECKING:
    from onnxq.config import QuantConfig

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _floats(text: str | None, option: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option}: expected numbers separated by commas, got '{text}'") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise ConfigError(f"{option}: expected 1 or 3 values, got {len(parts)}")
    return (parts[0], parts[1], parts[2])


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        height, width = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--image-size: expected HxW such as 224x224, got '{text}'") from None
    return (height, width)


#: `onnxq.data.images.Layout`'s values.
LAYOUTS = ("auto", "nchw", "nhwc")


def image_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add image preprocessing options; the command receives `preprocess: ImagePreprocess`."""
    options: list[Decorator] = [
        click.option("--image-size", help="Crop size HxW (default: the model's input size)."),
        click.option("--resize", type=int, help="Shorter image side before the centre crop "
                     "(default: crop size x 256/224)."),
        click.option("--mean", help="Per-channel mean in 0-255 pixel units, RGB order "
                     "(default: ImageNet 123.675,116.28,103.53)."),
        click.option("--std", help="Per-channel std in 0-255 pixel units (default: ImageNet 58.395,57.12,57.375)."),
        click.option("--layout", type=click.Choice(LAYOUTS), default="auto",
                     show_default=True, help="Input layout; auto reads it from the model's input shape."),
        click.option("--bgr", is_flag=True, help="Feed channels in BGR order."),
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, image_size: str | None, resize: int | None, mean: str | None, std: str | None,
                layout: str, bgr: bool, **kwargs: Any) -> Any:
        from onnxq.data.images import ColorOrder, ImagePreprocess, Layout

        fields: dict[str, Any] = {"size": _size(image_size), "resize": resize,
                                  "layout": parse_enum(Layout, layout, "--layout"),
                                  "color": ColorOrder.BGR if bgr else ColorOrder.RGB}
        for name, text in (("mean", mean), ("std", std)):
            value = _floats(text, f"--{name}")
            if value is not None:
                fields[name] = value
        return fn(*args, preprocess=ImagePreprocess(**fields), **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def selection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add node exclusion options; the command receives `selection: Selection`."""

    @click.option("--exclude-nodes", "exclude_nodes", multiple=True, metavar="REGEX",
                  help="Keep nodes whose name matches REGEX in float (repeatable).")
    @click.option("--exclude-op-types", "exclude_op_types", multiple=True, metavar="T,...",
                  help="Keep these op types in float, e.g. Gemm,MatMul (repeatable).")
    @click.option("--quantize-attention/--no-quantize-attention", default=None,
                  help="Quantize the attention MatMuls next to a Softmax, or keep them float. Default: float for "
                       "--target trt; for ort-cpu, measured by quantize --calib: both plans are built and attention "
                       "stays quantized only if the worst output SQNR on 16 held-back samples is within 0.5 dB "
                       "(inspect, calibrate and quantize --stats keep them quantized).")
    @functools.wraps(fn)
    def wrapper(*args: Any, exclude_nodes: tuple[str, ...], exclude_op_types: tuple[str, ...],
                quantize_attention: bool | None, **kwargs: Any) -> Any:
        selection = Selection(exclude_node_patterns=exclude_nodes, exclude_op_types=_split(exclude_op_types),
                              quantize_attention=quantize_attention)
        return fn(*args, selection=selection, **kwargs)

    return wrapper


TARGET_HELP = ("Runtime the Q/DQ placement is written for: trt (int8 symmetric, TensorRT's fusion rules) or "
               "ort-cpu (uint8 activations, int8 weights, placed for ONNX Runtime's CPU integer kernels); "
               "any registered onnxq.targets target.")


def _registered_target(context: click.Context, parameter: click.Parameter, name: str) -> str:
    """A registered target's name (checked when the command runs, so targets registered later count)."""
    from onnxq.targets import targets

    if name not in targets():
        raise click.BadParameter(f"'{name}' is not one of {', '.join(targets())}", context, parameter)
    return name


def target_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --target (a registered target's name; looked up by quant_config)."""
    return click.option("--target", metavar="NAME", default="trt", show_default=True, callback=_registered_target,
                        help=TARGET_HELP)(fn)


def calib_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --batch-size, --max-samples and --providers (passed through as raw values)."""
    fn = click.option("--max-samples", type=click.IntRange(min=1), metavar="N",
                      help="Calibrate on at most N samples of --calib, the first ones. A loader script may then be "
                           "an endless generator (without it, one giving over 100000 samples is stopped).")(fn)
    fn = click.option("--providers", multiple=True, metavar="P,...",
                      help="ONNX Runtime execution providers for calibration, e.g. cuda,cpu (default: cpu).")(fn)
    return click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                        help="Samples per calibration run (models with a fixed batch size use theirs).")(fn)


def smoothquant_value(ctx: click.Context, param: click.Parameter, value: str | None) -> float | bool | None:
    """--smoothquant's value: None (not given), True ("auto": alpha measured per layer) or an alpha in (0, 1)."""
    if value is None or value == "auto":
        return None if value is None else True
    try:
        alpha = float(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is neither auto nor a number (alpha in (0, 1))") from None
    if not 0.0 < alpha < 1.0:
        raise click.BadParameter(f"alpha must be in (0, 1) (exclusive), got {value}")
    return alpha


def quant_config(selection: Selection, method: str, target: str, high_precision: str, batch_size: int,
                 providers: tuple[str, ...], percentile: float = 99.99, smoothquant: float | bool | None = None,
                 latency_search: bool | None = False, equalize: bool | None = None,
                 bias_correction: bool | None = None) -> QuantConfig:
    """Build the typed QuantConfig from the quantize command's raw option values."""
    from onnxq.config import QuantConfig
    from onnxq.runtime.session import resolve_providers
    from onnxq.targets import get_target

    calib = CalibConfig(method=parse_enum(CalibMethod, method, "--method"), batch_size=batch_size,
                        providers=resolve_providers(_split(providers) or ("cpu",)), percentile=percentile)
    return QuantConfig(selection=selection, calib=calib, target=get_target(target),
                       high_precision=parse_enum(HighPrecision, high_precision, "--high-precision"),
                       smoothquant=smoothquant, latency_search=latency_search, equalize=equalize,
                       bias_correction=bias_correction)


def output_path(model_path: Path, output: Path | None, suffix: str = ".int8.onnx",
                protected: tuple[str | Path | None, ...] = (), option: str = "-o") -> Path:
    """`-o` (or the output option named `option`) or `<stem><suffix>` beside the model, checked before any
    work is done.

    Raises:
        ConfigError: the path names the input model or another input file (`protected`: data files
            that exist), by any spelling, symlink or hard link; or it is a folder.
        ModelError: the folder it would be written into does not exist.
    """
    from onnxq.io import is_same_file

    target = output if output is not None else model_path.with_name(model_path.stem + suffix)
    if target.exists():
        for source in (model_path, *protected):
            if source is not None and Path(source).is_file() and is_same_file(target, source):
                what = "the input model" if source is model_path else f"the input file {source}"
                raise ConfigError(f"{option} {target} names {what}; refusing to overwrite it")
    if target.is_dir():
        raise ConfigError(f"{option} {target} is a folder; give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise ModelError(f"{option} {target}: the folder {folder} does not exist")
    return target


#: `onnxq.config.AccuracyGoal().samples`.
DEFAULT_HELD_BACK = 32


def accuracy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --min-cosine, --max-sqnr-drop, --write-anyway, --held-back, --jobs; the command gets `accuracy`."""

    @click.option("--min-cosine", type=float, metavar="C",
                  help="Accuracy target: leave the fewest layers in float (most sensitive first) so that every "
                       "output's cosine to the float model on held-back data is at least C, e.g. 0.99.")
    @click.option("--max-sqnr-drop", type=float, metavar="DB",
                  help="Accuracy target: quantization noise stays at least DB dB below each output's signal "
                       "(SQNR >= DB on held-back data).")
    @click.option("--write-anyway", is_flag=True,
                  help="Write a model even when the target is not met (the fully quantized one when no model "
                       "with a quantized layer meets it); exit 0.")
    @click.option("--held-back", type=click.IntRange(min=1), default=DEFAULT_HELD_BACK, show_default=True,
                  metavar="N", help="Held-back samples for the target: the first N of --eval, else every 4th "
                                    "calibration sample (then not used for calibration), up to N.")
    @click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
                  help="Measure the target's layers in N processes at once, each with its own ONNX Runtime "
                       "session and cores/N threads (the fallback search measures ahead); the ranking, the "
                       "layers left float and the model are the same as with 1.")
    @functools.wraps(fn)
    def wrapper(*args: Any, min_cosine: float | None, max_sqnr_drop: float | None, write_anyway: bool,
                held_back: int, jobs: int, **kwargs: Any) -> Any:
        from onnxq.config import AccuracyGoal

        accuracy = None
        if min_cosine is not None or max_sqnr_drop is not None:
            accuracy = AccuracyGoal(min_cosine=min_cosine, max_sqnr_drop_db=max_sqnr_drop,
                                      write_anyway=write_anyway, samples=held_back, jobs=jobs)
        elif write_anyway:
            raise click.UsageError("--write-anyway needs an accuracy target: --min-cosine or --max-sqnr-drop")
        elif jobs != 1:
            raise click.UsageError("--jobs needs an accuracy target: --min-cosine or --max-sqnr-drop")
        return fn(*args, accuracy=accuracy, **kwargs)

    return wrapper


def ray_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --ray [ADDRESS], --workers, --cpus-per-worker, --gpus-per-worker; the command gets `backend`
    (a RayBackend, or None without --ray). Ray itself is imported here, when --ray is given, so that a
    missing extra is a one-line error (exit 2) before any work."""

    @click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                  help="Calibrate on Ray (needs onnxq[ray]): alone, a local Ray instance started for the run; auto, "
                       "the cluster this machine belongs to (ray start, ray job submit); HOST:PORT, that head. "
                       "The statistics are identical to a run without it; with an accuracy target (quantize "
                       "--min-cosine), its per-layer runs go to the same workers, with the serial run's result.")
    @click.option("--workers", type=click.IntRange(min=1), metavar="N",
                  help="With --ray: worker actors (default: as many as the cluster's free CPUs hold, "
                       "--cpus-per-worker each).")
    @click.option("--cpus-per-worker", type=click.IntRange(min=1), metavar="K",
                  help="With --ray: CPUs each worker reserves, and its ONNX Runtime threads (default: 1).")
    @click.option("--gpus-per-worker", type=click.FloatRange(min=0.0), metavar="G",
                  help="With --ray: GPUs each worker reserves (with a GPU provider in --providers).")
    @functools.wraps(fn)
    def wrapper(*args: Any, ray_address: str | None, workers: int | None, cpus_per_worker: int | None,
                gpus_per_worker: float | None, **kwargs: Any) -> Any:
        if ray_address is None:
            given = [name for name, value in (("--workers", workers), ("--cpus-per-worker", cpus_per_worker),
                                              ("--gpus-per-worker", gpus_per_worker)) if value is not None]
            if given:
                raise click.UsageError(f"{given[0]} needs --ray")
            return fn(*args, backend=None, **kwargs)
        from onnxq.cluster.backend import RayBackend
        from onnxq.cluster.connect import import_ray

        import_ray(local=ray_address == "local")
        backend = RayBackend(ray_address, workers, cpus_per_worker or 1, gpus_per_worker or 0.0)
        return fn(*args, backend=backend, **kwargs)

    return wrapper
