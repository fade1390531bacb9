"""`onnxq quantize MODEL --calib PATH`: calibrate and write an INT8 Q/DQ model for the chosen --target."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .build import build_and_save, check_engine_build, require_engine_build
from .logs import quiet_libraries
from .options import (accuracy_options, calib_options, image_options, output_path, quant_config, ray_options,
                      selection_options, smoothquant_value, target_option)
from .outputs import replacing, written
from .plan_text import plan_counts
from .progress import StageProgress, plural

if TYPE_CHECKING:
    from onnxq.cluster.backend import RayBackend
    from onnxq.config import AccuracyGoal
    from onnxq.data.images import ImagePreprocess
    from onnxq.options import Selection


@click.command("quantize")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", "calib_path", metavar="PATH",
              help="Calibration data: .npz/.npy, a folder of them or of images, or loader.py:function.")
@click.option("--stats", "stats_path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="Statistics from `onnxq calibrate` instead of --calib: no inference, any --method.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output model (default: <MODEL stem>.int8.onnx beside MODEL).")
@click.option("--method", type=click.Choice(["max", "entropy", "percentile", "mse", "auto"]), default="max",
              show_default=True, help="How activation ranges are chosen (weights: always per-channel max).")
@click.option("--percentile", type=float, default=99.99, show_default=True,
              help="For --method percentile: the share of |x| kept inside the range, in percent, in (0, 100].")
@target_option
@click.option("--high-precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Type of the parts left unquantized.")
@selection_options
@calib_options
@click.option("--eval", "eval_path", metavar="PATH",
              help="Held-out data to compare the float and INT8 models on, in any --calib format.")
@click.option("--engine", metavar="OUT.plan", type=click.Path(dir_okay=False, path_type=Path),
              help="Also build a TensorRT engine from the INT8 model and write its plan here (needs onnxq[trt]).")
@accuracy_options
@click.option("--smoothquant", "smoothquant", is_flag=False, flag_value="auto", default=None, metavar="[auto|ALPHA]",
              callback=smoothquant_value,
              help="SmoothQuant (on by default with --calib): move activation outliers of MatMul/Gemm inputs into the "
                   "weights, through the producer (LayerNorm, a linear layer) or an explicit per-channel Mul (GELU "
                   "outputs, attention outputs). auto (the default): alpha measured per layer, kept only where it "
                   "cuts the error; ALPHA in (0, 1): that migration strength everywhere.")
@click.option("--no-smoothquant", is_flag=True, default=False, help="No SmoothQuant.")
@click.option("--equalize/--no-equalize", default=None,
              help="Cross-layer equalization before calibrating: balance the per-channel weight ranges of Conv "
                   "pairs across ReLU-like activations (Nagel et al., 2019); float outputs unchanged. Default: on; "
                   "with --stats it must match the file's setting (onnxq calibrate's). Pairs across ReLU6 or HardSwish "
                   "are left alone.")
@click.option("--latency-search/--no-latency-search", default=None,
              help="--target ort-cpu (on by default there when --calib is given): time each class of quantized "
                   "layers (e.g. 5x5 depthwise Convs) in INT8 and in float on one calibration batch on this "
                   "machine, and keep in float the classes ORT runs faster in float. The output then depends on "
                   "the machine it ran on; --no-latency-search gives the rule-based plan alone.")
@click.option("--bias-correction/--no-bias-correction", default=None,
              help="Correct each quantized Conv/ConvTranspose/Gemm/MatMul bias for the mean shift quantization gives "
                   "its output channels (measured on the calibration data), kept only if it raises the SQNR on "
                   "held-back samples (Nagel et al., ICCV 2019). Default: on with --calib (off on models over "
                   "ONNXQ_LARGE_MODEL_BYTES); skipped with --stats.")
@click.option("--report", "report_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Write report.json and report.md (and sensitivity.png with onnxq[report]) into DIR.")
@ray_options
@image_options
def quantize_cmd(model_path: Path, calib_path: str | None, stats_path: Path | None, output: Path | None,
                 method: str, percentile: float, target: str, high_precision: str, selection: Selection,
                 batch_size: int, max_samples: int | None, providers: tuple[str, ...], eval_path: str | None, engine: Path | None,
                 accuracy: AccuracyGoal | None, smoothquant: float | bool | None, no_smoothquant: bool,
                 equalize: bool | None,
                 latency_search: bool | None, bias_correction: bool | None, report_dir: Path | None,
                 backend: RayBackend | None, preprocess: ImagePreprocess) -> None:
    """Quantize MODEL to INT8 (Q/DQ), calibrating on --calib data or reusing --stats.

    With --min-cosine or --max-sqnr-drop, the INT8 model is measured on held-back data; when it misses
    the target, every layer's sensitivity is measured and the fewest layers stay in float that meet it;
    without a model that meets it, nothing is written and the exit code is 1 (unless --write-anyway).

    \b
    Examples:
      onnxq quantize model.onnx --calib calib/ -o model.int8.onnx --eval eval/
      onnxq quantize model.onnx --stats model.onnxq.npz --method entropy
      onnxq quantize model.onnx --calib calib/ --eval eval/ --min-cosine 0.99
      onnxq quantize model.onnx --calib calib/ --target ort-cpu --no-latency-search
    """
    if (calib_path is None) == (stats_path is None):
        raise click.UsageError("give --calib PATH or --stats FILE (one of them)")
    if max_samples is not None and calib_path is None:
        raise click.UsageError("--max-samples applies to --calib data, not to --stats")
    if backend is not None and stats_path is not None:
        raise click.UsageError("--ray calibrates on --calib data; with --stats there is nothing to calibrate")
    if backend is not None and accuracy is not None and eval_path is None:
        raise click.UsageError("--ray calibrates on every --calib sample, so an accuracy target's held-back samples "
                               "must come from --eval DATA")
    if backend is not None and accuracy is not None and accuracy.jobs != 1:
        raise click.UsageError("--jobs runs local processes; with --ray the accuracy target's runs go to the Ray "
                               "workers: give one of them")
    if no_smoothquant and smoothquant is not None:
        raise click.UsageError("give --smoothquant or --no-smoothquant, not both")
    quiet_libraries()
    from onnxq.data.signature import signature_of
    from onnxq.data.sources import open_source
    from onnxq.io import external_data_files, load_model, save_model
    from onnxq.metrics import compare_models, format_metrics
    from onnxq.pipeline import quantize

    from .summary import finding_lines, write_run_report

    smoothquant = False if no_smoothquant else smoothquant
    if engine is not None:  # a missing TensorRT or GPU must fail before any calibration
        require_engine_build()
    config = quant_config(selection, method, target, high_precision, batch_size, providers, percentile, smoothquant,
                          latency_search, equalize, bias_correction)
    model = load_model(model_path)
    destination = output_path(model_path, output, protected=(calib_path, eval_path, stats_path))
    plan_path = (check_engine_build(model_path, engine, model, {}, protected=(calib_path, eval_path, stats_path))
                 if engine is not None else None)
    if plan_path is not None and plan_path.resolve() == destination.resolve():
        raise click.UsageError(f"--engine {engine} names the output model")
    # Open the evaluation data first: a mistake in it must not cost a calibration run.
    signature = signature_of(model)
    evaluation = open_source(eval_path, signature, preprocess) if eval_path is not None else None
    calib = open_source(calib_path, signature, preprocess, max_samples) if calib_path is not None else None
    if backend is not None:
        from onnxq.cluster.backend import ShardedData

        calib = ShardedData.at(calib_path, preprocess, max_samples)  # opened above: checked before any work
    with StageProgress() as progress:
        result = quantize(model, calib, config, stats=stats_path, preprocess=preprocess, on_progress=progress,
                          accuracy=accuracy, eval_source=evaluation, backend=backend)
    metrics = ()
    if evaluation is not None:  # before the model is written: a Ctrl-C here leaves an earlier -o file alone
        metrics = compare_models(model, result.model, evaluation.batches(signature.batch_size(config.calib.batch_size)),
                                 config.calib.providers)
    weights_file = destination.with_name(destination.name + ".data")  # written beside a model over 2 GB
    weights_before = weights_file.stat().st_mtime_ns if weights_file.exists() else None
    replacing(destination, weights_file)
    written(save_model(result.model, destination, keep=external_data_files(model_path)))
    if weights_file.exists() and weights_file.stat().st_mtime_ns != weights_before:
        written(weights_file)
    engine_summary = build_and_save(destination, plan_path, {}) if plan_path is not None else None
    calib = result.calibration
    click.echo(f"wrote {destination}")
    click.echo(f"  plan         {plan_counts(result.plan)}")
    if stats_path is not None:
        click.echo(f"  calibration  {plural(calib.samples, 'sample')} from {stats_path}, method {method}")
    else:
        click.echo(f"  calibration  {plural(calib.samples, 'sample')} in {plural(calib.batches, 'batch', 'batches')} "
                   f"on {', '.join(calib.providers)}, method {method} ({calib.seconds:.1f} s)")
    missing = [p for p in config.calib.providers if p not in calib.providers] if stats_path is None else []
    if missing:
        click.echo(f"  note         {', '.join(missing)} requested but could not be loaded: "
                   f"calibration ran on {', '.join(calib.providers)}")
    for note in result.notes:
        click.echo(f"  note         {note}")
    for line in finding_lines(result.findings):
        click.echo(line)
    if evaluation is not None:
        click.echo(f"  float vs int8 on {evaluation.describe()}:")
        click.echo("    " + format_metrics(metrics).replace("\n", "\n    "))
    if report_dir is not None:
        if not report_dir.exists():
            written(report_dir)
        from onnxq.report.files import REPORT_FILES

        replacing(*(report_dir / name for name in REPORT_FILES))
        reports = [written(path) for path in write_run_report(result, metrics, report_dir, config, model_path.stem)]
        click.echo(f"  report       {', '.join(map(str, reports))}")
    if engine_summary is not None:
        click.echo(f"  engine       {plan_path} built in {engine_summary.seconds:.1f} s; {engine_summary.log}; "
                   f"layers {engine_summary.layers}")
    click.echo(f"  total        {result.seconds:.1f} s")

