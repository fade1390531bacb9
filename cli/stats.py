"""`onnxq stats merge|show`: combine statistics files from shards of the data, or look inside one."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.errors import ConfigError

from .outputs import replacing, written
from .progress import plural


@click.group("stats", no_args_is_help=False)
def stats_group() -> None:
    """Work with statistics files written by `onnxq calibrate`."""


@stats_group.command("merge")
@click.argument("inputs", metavar="FILE...", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The merged statistics file.")
def merge_cmd(inputs: tuple[Path, ...], output: Path) -> None:
    """Merge statistics of one model collected on different shards of the calibration data.

    The result equals one `onnxq calibrate` run over all the shards' samples.

    \b
    Example:
      onnxq stats merge part1.onnxq.npz part2.onnxq.npz -o all.onnxq.npz
    """
    if len(inputs) < 2:
        raise click.UsageError("give at least two statistics files to merge")
    from onnxq.calib.stats_file import load_stats, merge_stats, save_stats
    from onnxq.io import is_same_file

    for source in inputs:
        if output.exists() and source.is_file() and is_same_file(output, source):
            raise ConfigError(f"-o {output} names the input file {source}; refusing to overwrite it")
    merged = load_stats(inputs[0])
    for source in inputs[1:]:
        merged = merge_stats(merged, load_stats(source), what=f"merging {source}")
    replacing(output)
    written(save_stats(merged, output))
    click.echo(f"wrote {output}: {plural(len(merged.histograms), 'tensor')}, {plural(merged.samples, 'sample')} "
               f"from {plural(len(inputs), 'file')}")
    if merged.shards:
        missing = merged.missing_shards()
        click.echo(f"  shards {', '.join(merged.shards)}" + (f"; missing {', '.join(missing)}" if missing else
                                                             " (complete)"))


@stats_group.command("show")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For the percentile column.")
def show_cmd(path: Path, percentile: float) -> None:
    """Print every tensor's range under each calibration method."""
    from onnxq.calib.amax import entropy_amax, max_amax, mse_amax, percentile_amax
    from onnxq.calib.stats_file import load_stats

    stats = load_stats(path)
    click.echo(f"{path}: {plural(len(stats.histograms), 'tensor')}, {plural(stats.samples, 'sample')}, "
               f"model digest {stats.model_digest[:12]}" + (f", after {', '.join(stats.rewrites)}" if stats.rewrites else ""))
    if stats.shards:
        missing = stats.missing_shards()
        click.echo(f"shards {', '.join(stats.shards)}" + (f"; missing {', '.join(missing)}" if missing else " (complete)"))
    width = max((len(name) for name in stats.histograms), default=6)
    click.echo(f"{'tensor':<{width}}  {'max':>10} {'entropy':>10} {f'p{percentile:g}':>10} {'mse':>10}  ignored")
    for name, h in stats.histograms.items():
        values = (max_amax(h), entropy_amax(h), percentile_amax(h, percentile), mse_amax(h))
        click.echo(f"{name:<{width}}  " + " ".join(f"{v:10.4g}" for v in values) + f"  {h.num_ignored}")
