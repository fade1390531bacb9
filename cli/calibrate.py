"""`onnxq calibrate MODEL --calib PATH -o stats.onnxq.npz`: collect statistics once, quantize many times."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .logs import quiet_libraries
from .options import (calib_options, image_options, output_path, quant_config, ray_options, selection_options,
                      target_option)
from .outputs import replacing, written
from .progress import StageProgress, plural

if TYPE_CHECKING:
    from onnxq.cluster.backend import RayBackend
    from onnxq.config import QuantConfig
    from onnxq.data.images import ImagePreprocess
    from onnxq.options import Selection


@click.command("calibrate")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", "calib_path", required=True, metavar="PATH",
              help="Calibration data: .npz/.npy, a folder of them or of images, or loader.py:function.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Statistics file (default: <MODEL stem>.onnxq.npz beside MODEL; with --shard I/N, "
                   "<MODEL stem>.shard-I-of-N.onnxq.npz).")
@click.option("--shard", "shard_text", metavar="I/N",
              help="Only shard I of N of the data (numbered from 0, e.g. 0/4 to 3/4), for N jobs on a scheduler; "
                   "`onnxq stats merge` of the N files equals one run.")
@target_option
@selection_options
@calib_options
@click.option("--equalize/--no-equalize", default=None,
              help="Collect after cross-layer equalization, as quantize does by default (the file records it: "
                   "quantize --stats must use the same setting).")
@ray_options
@image_options
def calibrate_cmd(model_path: Path, calib_path: str, output: Path | None, shard_text: str | None, target: str,
                  selection: Selection, batch_size: int, max_samples: int | None, providers: tuple[str, ...],
                  equalize: bool | None, backend: RayBackend | None, preprocess: ImagePreprocess) -> None:
    """Run the calibration data through MODEL and save histograms of every tensor it would quantize.

    `onnxq quantize MODEL --stats FILE --method M` then picks ranges with any method in seconds,
    without inference. Files from shards of the data merge exactly with `onnxq stats merge`.

    \b
    Example:
      onnxq calibrate model.onnx --calib calib/ -o model.onnxq.npz
      onnxq quantize model.onnx --stats model.onnxq.npz --method entropy
    \b
    Sharded (e.g. one Slurm array task or Kubernetes indexed job per shard):
      onnxq calibrate model.onnx --calib calib/ --shard $I/4      # I = 0..3
      onnxq stats merge model.shard-*-of-4.onnxq.npz -o model.onnxq.npz
    \b
    On Ray (the same statistics; the data at a path every node reads):
      onnxq calibrate model.onnx --calib /shared/calib/ --ray auto --workers 8
    """
    if backend is not None and shard_text is not None:
        raise click.UsageError("give --ray or --shard, not both (--ray cuts the data into shards itself)")
    quiet_libraries()
    from onnxq.cluster.backend import ShardedData
    from onnxq.calib.stats_file import save_stats
    from onnxq.data.signature import signature_of
    from onnxq.data.shards import Shard
    from onnxq.data.sources import open_source
    from onnxq.io import load_model
    from onnxq.pipeline import collect_stats

    config: QuantConfig = quant_config(selection, "max", target, "fp32", batch_size, providers, equalize=equalize)
    shard = Shard.parse(shard_text) if shard_text is not None else None
    model = load_model(model_path)
    suffix = ".onnxq.npz" if shard is None else f".shard-{shard.index}-of-{shard.count}.onnxq.npz"
    destination = output_path(model_path, output, suffix=suffix, protected=(calib_path,))
    if backend is None:
        calib = open_source(calib_path, signature_of(model), preprocess, max_samples, shard)
    else:
        calib = ShardedData.at(calib_path, preprocess, max_samples)
    with StageProgress() as progress:
        stats, calibration = collect_stats(model, calib, config, preprocess=preprocess, on_progress=progress,
                                           backend=backend)
    replacing(destination)
    written(save_stats(stats, destination))
    click.echo(f"wrote {destination}")
    click.echo(f"  statistics   {plural(len(stats.histograms), 'tensor')}, {stats.num_bins} bins each, "
               f"{plural(stats.samples, 'sample')} in {plural(stats.batches, 'batch', 'batches')} "
               f"on {', '.join(calibration.providers)} ({calibration.seconds:.1f} s)")
    if shard is not None:
        click.echo(f"  data         {getattr(calib, 'describe', lambda: calib_path)()}")
