"""Per-layer sensitivity for the report: the row protocol, the ranking, and the PNG chart.

The chart needs the `report` extra (matplotlib). matplotlib is imported only inside the functions, and
only its object-oriented API with the Agg canvas is used: no pyplot, no global backend switch, no
window. One horizontal bar per layer, the most sensitive (lowest SQNR with only that layer quantized)
at the top; the figure grows with the number of layers so that 100+ labels stay readable.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

__all__ = ["CHART_FILE", "SensitivityRow", "LayerRow", "rank_layers", "available", "sensitivity_png"]

CHART_FILE = "sensitivity.png"
_ROW_INCHES = 0.22  # per bar: fits an 8-point label
_MAX_PIXELS = 30000  # well under Agg's 2**16 limit per side
_LABEL_CHARS = 48


class SensitivityRow(Protocol):
    """One layer of a per-layer sensitivity analysis, as the report and the chart read it (any object
    with these attributes): output cosine and SQNR with only this layer quantized, and as recovered
    with this layer kept float."""

    @property
    def node_name(self) -> str: ...
    @property
    def op_type(self) -> str: ...
    @property
    def alone_cosine(self) -> float | None: ...
    @property
    def alone_sqnr_db(self) -> float | None: ...
    @property
    def recovered_cosine(self) -> float | None: ...
    @property
    def recovered_sqnr_db(self) -> float | None: ...


@dataclass(frozen=True)
class LayerRow:
    """A ranked sensitivity row: rank 1 is the most sensitive layer (lowest SQNR when quantized alone)."""

    rank: int
    node_name: str
    op_type: str
    alone_cosine: float | None
    alone_sqnr_db: float | None
    recovered_cosine: float | None
    recovered_sqnr_db: float | None


def rank_layers(rows: Iterable[SensitivityRow]) -> tuple[LayerRow, ...]:
    """Rows sorted most sensitive first: by SQNR alone, then cosine alone, then name.

    NaN (the output broke) ranks as most sensitive; a missing value (None) ranks last.
    """
    layers = [LayerRow(0, str(r.node_name), str(r.op_type), *map(_optional_float, (
        r.alone_cosine, r.alone_sqnr_db, r.recovered_cosine, r.recovered_sqnr_db))) for r in rows]

    def key(row: LayerRow) -> tuple[float, float, str]:
        def worst_first(value: float | None) -> float:
            return math.inf if value is None else (-math.inf if math.isnan(value) else value)
        return worst_first(row.alone_sqnr_db), worst_first(row.alone_cosine), row.node_name

    return tuple(replace(row, rank=i) for i, row in enumerate(sorted(layers, key=key), start=1))


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _label(row: SensitivityRow) -> str:
    text = f"{row.node_name} ({row.op_type})"
    return text if len(text) <= _LABEL_CHARS else "…" + text[-(_LABEL_CHARS - 1):]


def _bar_values(values: Sequence[float | None]) -> tuple[list[float], list[str]]:
    """Bar lengths (inf drawn at the largest finite value, NaN/None at 0) and the text beside each bar."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    cap = max(max(finite, default=0.0), 1.0)
    lengths, texts = [], []
    for v in values:
        if v is None or math.isnan(v):
            lengths.append(0.0)
            texts.append("n/a" if v is None else "nan")
        elif math.isinf(v):
            lengths.append(cap if v > 0 else 0.0)
            texts.append("inf" if v > 0 else "-inf")
        else:
            lengths.append(v)
            texts.append(f"{v:.1f}")
    return lengths, texts


def sensitivity_png(rows: Sequence[SensitivityRow], title: str = "per-layer sensitivity") -> bytes:
    """A horizontal bar chart of SQNR (dB) with each layer quantized alone, in the order of `rows`.

    Args:
        rows: layers, most sensitive first (as `onnxq.report.document.rank_layers` returns them).
        title: the chart's title.

    Returns:
        The PNG file's bytes.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(rows), 1)
    height = 1.4 + _ROW_INCHES * n
    figure = Figure(figsize=(10.0, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = list(range(len(rows)))
    lengths, texts = _bar_values([r.alone_sqnr_db for r in rows])
    bars = axes.barh(positions, lengths, height=0.7, color="#4878a8", label="SQNR, only this layer INT8")
    for bar, text, value in zip(bars, texts, (r.alone_sqnr_db for r in rows)):
        if value is not None and math.isinf(value):
            bar.set_hatch("//")  # drawn at the largest finite value: no quantization error at all
        axes.annotate(text, (max(bar.get_width(), 0.0), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                      textcoords="offset points", va="center", fontsize=7)
    recovered = [(p, r.recovered_sqnr_db) for p, r in zip(positions, rows)
                 if r.recovered_sqnr_db is not None and math.isfinite(r.recovered_sqnr_db)]
    if recovered:
        axes.scatter([v for _, v in recovered], [p for p, _ in recovered], marker="D", s=14, color="#c44e52",
                     zorder=3, label="SQNR recovered, this layer float")
    axes.set_yticks(positions, [_label(r) for r in rows], fontsize=8 if n > 40 else 9)
    axes.set_ylim(n - 0.5, -0.5)  # the first (most sensitive) row at the top
    axes.set_xlabel("model output SQNR (dB); lower = more sensitive")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    if n > 40:  # a tall chart: the scale at the top as well
        axes.tick_params(axis="x", labeltop=True)
    figure.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=min(100, int(_MAX_PIXELS / height)))
    return buffer.getvalue()
