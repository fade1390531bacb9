"""`onnxq inspect MODEL`: print the quantization plan without calibrating."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import click

from .logs import quiet_libraries
from .options import selection_options, target_option
from .plan_text import format_plan, format_plan_summary

if TYPE_CHECKING:
    from onnxq.options import Selection


@click.command("inspect")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@selection_options
@target_option
@click.option("--summary", is_flag=True, help="Only counts and the reasons nodes stay float.")
def inspect_cmd(model_path: Path, selection: Selection, target: str, summary: bool) -> None:
    """Show what would be quantized in MODEL, and why every other node is not.

    \b
    Example:
      onnxq inspect model.onnx --exclude-op-types Gemm
    """
    quiet_libraries()
    from onnxq.pipeline import inspect

    plan = inspect(model_path, selection, target)
    click.echo(format_plan_summary(plan) if summary else format_plan(plan))
