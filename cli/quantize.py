"""`onnxq quantize MODEL --calib PATH`: calibrate and write an INT8 Q/DQ model for TensorRT."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from onnxq.api import quantize
from onnxq.calib.data import input_specs, open_source
from onnxq.calib.images import ImagePreprocess
from onnxq.config import Selection
from onnxq.io import load_model, save_model
from onnxq.summary import plan_counts
from onnxq.verify import compare_models, format_metrics

from .options import image_options, output_path, quant_config, selection_options


class _Progress:
    """A click progress bar on stderr driven by the library's (done, total) callback.

    Drawn only when stderr is a terminal and `-q` was not given, so logs and pipes stay clean.
    """

    def __init__(self, label: str, quiet: bool) -> None:
        self.label, self.bar, self.done, self.started = label, None, 0, time.perf_counter()
        self.stream = sys.stderr
        self.hidden = quiet or self.stream is None or not self.stream.isatty()  # None: no console (pythonw)

    def __call__(self, done: int, total: int | None) -> None:
        if self.hidden:
            return
        if self.bar is None:
            # An unsized iterable makes a bar of unknown length (position and rate only).
            unsized = (item for item in ())
            self.bar = click.progressbar(unsized if total is None else None, length=total, label=self.label,
                                         file=self.stream, show_pos=True, item_show_func=self._rate)
            self.bar.__enter__()
        step, self.done = done - self.done, done
        self.bar.update(step)

    def _rate(self, _: object) -> str:
        return f"{self.done / max(time.perf_counter() - self.started, 1e-9):.1f} samples/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


@click.command("quantize", no_args_is_help=True)
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", "calib_path", required=True, metavar="PATH",
              help="Calibration data: .npz/.npy, a folder of them or of images, or loader.py:function.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output model (default: <MODEL stem>.int8.onnx beside MODEL).")
@click.option("--method", type=click.Choice(["max"]), default="max", show_default=True,
              help="How activation ranges are chosen.")
@click.option("--target", type=click.Choice(["trt"]), default="trt", show_default=True,
              help="Runtime the Q/DQ placement is written for.")
@click.option("--high-precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Type of the parts left unquantized.")
@selection_options
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples per calibration run (models with a fixed batch size use theirs).")
@click.option("--providers", multiple=True, metavar="P,...",
              help="ONNX Runtime execution providers for calibration, e.g. cuda,cpu (default: cpu).")
@click.option("--eval", "eval_path", metavar="PATH",
              help="Held-out data to compare the float and INT8 models on, in any --calib format.")
@image_options
def quantize_cmd(model_path: Path, calib_path: str, output: Path | None, method: str, target: str,
                 high_precision: str, selection: Selection, batch_size: int, providers: tuple[str, ...],
                 eval_path: str | None, preprocess: ImagePreprocess) -> None:
    """Quantize MODEL to INT8 (Q/DQ) using the calibration data at PATH.

    \b
    Example:
      onnxq quantize model.onnx --calib calib/ -o model.int8.onnx --eval eval/
    """
    config = quant_config(selection, method, target, high_precision, batch_size, providers)
    model = load_model(model_path)
    destination = output_path(model_path, output, protected=(calib_path, eval_path))
    # Open the evaluation data first: a mistake in it must not cost a calibration run.
    evaluation = open_source(eval_path, input_specs(model), preprocess) if eval_path is not None else None
    progress = _Progress("calibrating", quiet=bool(click.get_current_context().find_root().params.get("quiet")))
    try:
        result = quantize(model, calib_path, config, preprocess=preprocess, on_progress=progress)
    finally:
        progress.close()
    save_model(result.model, destination)
    calib = result.calibration
    click.echo(f"wrote {destination}")
    click.echo(f"  plan         {plan_counts(result.plan)}")
    click.echo(f"  calibration  {_plural(calib.samples, 'sample')} in {_plural(calib.batches, 'batch', 'batches')} "
               f"on {', '.join(calib.providers)} ({calib.seconds:.1f} s)")
    missing = [p for p in config.calib.providers if p not in calib.providers]
    if missing:
        click.echo(f"  note         {', '.join(missing)} requested but could not be loaded: "
                   f"calibration ran on {', '.join(calib.providers)}")
    if evaluation is not None:
        metrics = compare_models(model, result.model, evaluation.batches(config.calib.batch_size),
                                 config.calib.providers)
        click.echo(f"  float vs int8 on {evaluation.describe()}:")
        click.echo("    " + format_metrics(metrics).replace("\n", "\n    "))
    click.echo(f"  total        {result.seconds:.1f} s")
