"""Fixtures for the command-line tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import Workspace, make_workspace


@pytest.fixture()
def work(tmp_path: Path) -> Workspace:
    """The synthetic residual CNN (input `input`, N x 3 x 32 x 32) and CALIB_SAMPLES random samples for it."""
    return make_workspace(tmp_path)
