"""`onnxq build MODEL`: build a TensorRT engine plan from a (Q/DQ) ONNX model.

Also the helpers `onnxq quantize --engine` uses: `require_engine_build` and `check_engine_build` before
calibrating, so that a missing TensorRT or GPU, a bad plan path or an unbuildable shape fails fast, and
`build_and_save` after the model is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import click

from .logs import quiet_libraries
from .options import output_path
from .outputs import replacing, written

if TYPE_CHECKING:
    import onnx


def require_engine_build() -> None:
    """Fail with a one-line MissingDependencyError (exit 2) unless TensorRT 10+, the CUDA bindings and a GPU exist."""
    from onnxq.runtime.trt.runtime import require_gpu, require_tensorrt

    require_tensorrt()
    require_gpu()


def check_engine_build(model_path: Path, engine: Path | None, model: onnx.ModelProto,
                       shapes: Mapping[str, tuple[int, ...]], protected: tuple[str | Path | None, ...] = ()) -> Path:
    """Everything `build_and_save` needs, checked before any slow work; returns the plan's path.

    Args:
        model_path: the input model (never overwritten).
        engine: the requested plan path, or None for `<MODEL stem>.plan` beside the model.
        model: the loaded input model, whose inputs decide the shape profile.
        shapes: input shapes from --shapes (may be empty).
        protected: other input files the plan must not overwrite.
    """
    from onnxq.runtime.trt.build import profiles_for

    destination = output_path(model_path, engine, suffix=".plan", protected=protected)
    profiles_for(model, shapes)
    return destination


def precision_counts(counts: Mapping[str, int]) -> str:
    """Layer counts per type as text (INT8 24, FP32 5), or a note that the inspector reported none."""
    if not counts:
        return "not reported (the engine inspector gave no per-layer types)"
    return ", ".join(f"{name} {count}" for name, count in counts.items())


class EngineSummary(NamedTuple):
    """What a build reports: wall seconds, the summarised TensorRT log, layer precision counts as text."""

    seconds: float
    log: str
    layers: str


def build_and_save(model_path: Path, destination: Path, shapes: Mapping[str, tuple[int, ...]],
                   workspace_bytes: int = 1 << 30) -> EngineSummary:
    """Build the engine for `model_path` and write its plan atomically to `destination`."""
    from onnxq.runtime.trt.build import BuildConfig, build_engine, save_plan

    result = build_engine(model_path, BuildConfig(shapes=dict(shapes), workspace_bytes=workspace_bytes))
    replacing(destination)
    save_plan(result.plan, destination)
    written(destination)
    return EngineSummary(result.seconds, result.log_summary, precision_counts(result.layer_precisions))


@click.command("build")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Engine plan file (default: <MODEL stem>.plan beside MODEL).")
@click.option("--shapes", metavar="NAME:DxD,...",
              help="Shapes for inputs with dynamic dimensions, e.g. input:8x3x224x224 (default: a dynamic batch "
                   "is 1; other dynamic dimensions must be given).")
@click.option("--workspace-mib", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Builder workspace memory limit in MiB.")
def build_cmd(model_path: Path, output: Path | None, shapes: str | None, workspace_mib: int) -> None:
    """Build a TensorRT engine plan from MODEL (strongly typed: the Q/DQ nodes set the precision).

    Needs TensorRT 10 or newer, cuda-python and an NVIDIA GPU: pip install 'onnxq[trt]'.

    \b
    Examples:
      onnxq build model.int8.onnx
      onnxq build model.int8.onnx -o model.plan --shapes input:8x3x224x224
    """
    from onnxq.runtime.trt.build import parse_shapes, read_model_header

    quiet_libraries()

    shape_map = parse_shapes(shapes) if shapes is not None else {}
    require_engine_build()
    destination = check_engine_build(model_path, output, read_model_header(model_path), shape_map)
    summary = build_and_save(model_path, destination, shape_map, workspace_mib << 20)
    click.echo(f"wrote {destination}")
    click.echo(f"  build        {summary.seconds:.1f} s")
    click.echo(f"  log          {summary.log}")
    click.echo(f"  layers       {summary.layers}")
