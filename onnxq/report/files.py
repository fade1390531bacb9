"""Writing the report files: report.json, report.md and (with matplotlib) sensitivity.png, each atomically."""

from __future__ import annotations

import os
from pathlib import Path

from onnxq.atomic import write_atomic
from onnxq.errors import OnnxqError
from onnxq.report.chart import CHART_FILE, available, sensitivity_png
from onnxq.report.document import QuantReport, to_json
from onnxq.report.markdown import to_markdown

__all__ = ["REPORT_FILES", "write_report"]

#: Every file `write_report` may write into its folder.
REPORT_FILES = ("report.json", "report.md", CHART_FILE)


def _write_atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, data, "the report")


def write_report(report: QuantReport, folder: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Write report.json, report.md and (with matplotlib and sensitivity rows) sensitivity.png into `folder`.

    The folder and its parents are created; each file is written to a temporary file and renamed.

    Returns:
        The paths written, in that order.

    Raises:
        OnnxqError: the folder or a file cannot be written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OnnxqError(f"{folder}: cannot create the report folder ({err.strerror or err})") from None
    chart, written = None, []
    if report.sensitivity and available():
        png = sensitivity_png(report.sensitivity, title=f"{report.model_name}: per-layer sensitivity")
        written.append(_write_atomic(folder / CHART_FILE, png))
        chart = CHART_FILE
    note = "No chart: matplotlib is not installed (`pip install 'onnxq[report]'`)."
    json_path = _write_atomic(folder / "report.json", to_json(report).encode("utf-8"))
    markdown = to_markdown(report, chart=chart, chart_note=note)
    return (json_path, _write_atomic(folder / "report.md", markdown.encode("utf-8")), *written)
