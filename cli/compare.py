"""`onnxq compare FLOAT QUANT --data PATH`: accuracy per output and latency of both models, as deployed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from onnxq.options import parse_enum

from .logs import quiet_libraries
from .options import image_options, output_path
from .outputs import replacing, written
from .progress import Progress, plural

if TYPE_CHECKING:
    from onnxq.compare import Backend, CompareResult, ModelRun
    from onnxq.data.images import ImagePreprocess

#: `onnxq.compare.Backend`'s values.
BACKENDS = ("ort", "trt")


@click.command("compare")
@click.argument("float_path", metavar="FLOAT", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("quant_path", metavar="QUANT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data_path", metavar="PATH", required=True,
              help="Inputs for both models, in any --calib format of `onnxq quantize`.")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True,
              help="ort: ONNX Runtime with all graph optimizations; trt: TensorRT engines (needs a GPU).")
@click.option("--providers", multiple=True, metavar="P,...",
              help="ONNX Runtime execution providers for both sessions, e.g. cuda,cpu (default: cpu).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples per run; the first batch is the one timed (models with a fixed batch use theirs).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed runs of each model before timing.")
@click.option("--iterations", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed runs of each model, interleaved with the other model's.")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="ONNX Runtime threads per operator, the same for both sessions (default: ONNX Runtime's).")
@click.option("--json", "json_path", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write every number (per-run times included) to this JSON file.")
@image_options
def compare_cmd(float_path: Path, quant_path: Path, data_path: str, backend: str, providers: tuple[str, ...],
                batch_size: int, warmup: int, iterations: int, threads: int | None, json_path: Path | None,
                preprocess: ImagePreprocess) -> None:
    """Compare QUANT with FLOAT as deployed: accuracy of every output, then latency.

    Both models get the same inputs. ONNX Runtime runs them with all graph
    optimizations enabled, as a deployment would (Q/DQ pairs fused into integer
    kernels where it can), so the numbers can differ slightly from the exact
    Q/DQ check of `quantize --eval`. Latency: warm-up runs, then timed runs of
    the first batch, taking turns (float, quant, float, ...) so that load from
    elsewhere on the machine hits both models alike; speed-up = float median /
    quant median.

    \b
    Examples:
      onnxq compare model.onnx model.int8.onnx --data eval/ --json report.json
      onnxq compare model.onnx model.int8.onnx --data eval.npz --backend trt
    """
    quiet_libraries()
    from onnxq.compare import Backend, CompareConfig, compare, require_backend, write_json

    chosen = parse_enum(Backend, backend, "--backend")
    require_backend(chosen)  # before any work: a missing TensorRT or GPU is found at once
    names = tuple(part.strip() for value in providers for part in value.split(",") if part.strip())
    if names and chosen is Backend.TRT:
        raise click.UsageError("--providers applies to --backend ort only")
    config = CompareConfig(backend=chosen, providers=names or ("cpu",), batch_size=batch_size,
                           warmup=warmup, iterations=iterations, intra_op_threads=threads)
    if json_path is not None:
        json_path = output_path(float_path, json_path, protected=(quant_path, data_path), option="--json")
    with Progress("comparing") as progress:
        result = compare(float_path, quant_path, data_path, config, preprocess=preprocess, on_progress=progress)
    if json_path is not None:  # before the report is printed: a JSON that cannot be written fails with no report
        replacing(json_path)
        written(write_json(result, json_path))
    for line in report_lines(result):
        click.echo(line)
    if json_path is not None:
        click.echo(f"wrote {json_path}")


def _model_line(role: str, run: ModelRun, backend: Backend) -> str:
    from onnxq.compare import Backend

    line = f"  {role:<12} {run.path}: {run.runtime}"
    if backend is Backend.ORT:
        line += f" on {', '.join(run.providers)}"
    if run.layer_precisions:
        line += " (" + ", ".join(f"{count} {kind}" for kind, count in run.layer_precisions) + " layers)"
    return line


def report_lines(result: CompareResult) -> list[str]:
    """The printed report: what ran, accuracy per output, then latency."""
    from onnxq.compare import Backend
    from onnxq.metrics import format_metrics
    from onnxq.runtime.timing import format_latency

    threads = "ONNX Runtime's default" if result.intra_op_threads is None else str(result.intra_op_threads)
    lines = [f"float vs quant on {result.data}", _model_line("float", result.reference, result.backend),
             _model_line("quant", result.candidate, result.backend)]
    for role, run in (("float", result.reference), ("quant", result.candidate)):
        if run.unloaded:
            lines.append(f"  note         {', '.join(run.unloaded)} requested but could not be loaded: "
                         f"the {role} model ran on {', '.join(run.providers)}")
    if result.backend is Backend.ORT:
        lines.append(f"  threads      per operator: {threads}, the same for both sessions")
    skipped = f"; {plural(result.skipped_samples, 'sample')} left out (short batch)" if result.skipped_samples else ""
    lines.append(f"  accuracy     {plural(result.samples, 'sample')} in "
                 f"{plural(result.batches, 'batch', 'batches')} of {result.batch_size}{skipped}:")
    lines += ["    " + line for line in format_metrics(result.metrics).splitlines()]
    clock = "CUDA events" if result.backend is Backend.TRT else "wall clock around session.run"
    lines.append(f"  latency      batch of {result.timed_batch} (the first), {result.warmup} warm-up + "
                 f"{result.iterations} timed runs each, {clock};")
    lines.append("               runs interleaved float, quant, float, ... so that machine noise hits both alike:")
    table = format_latency([("float", result.reference.latency), ("quant", result.candidate.latency)])
    lines += ["    " + line for line in table.splitlines()]
    lines.append(f"  speed-up     {result.speedup:.2f}x (float median / quant median; above 1: quant is faster)")
    lines.append(f"  total        {result.seconds:.1f} s")
    return lines
