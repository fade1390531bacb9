"""Where the repository and its committed models and data are, for tests at any depth under tests/."""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO", "MODELS"]

REPO = Path(__file__).resolve().parents[2]
# The shipped .onnx models, and their calibration and evaluation data under models/data/.
MODELS = REPO / "models"
