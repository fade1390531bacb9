"""Running a user's data-loader script: importing it, and saying in one line what it did when it failed."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxq.errors import CalibrationError, first_line

__all__ = ["import_loader", "describe_failure"]


def import_loader(script: Path, function_name: str) -> Callable[..., Any]:
    """The function `function_name` of `script`, imported as a module of its own."""
    if not script.is_file():
        raise CalibrationError(f"{script}: no such data-loader script")
    module_name = f"_onnxq_calib_loader_{abs(hash(str(script.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, script)
    if module_spec is None or module_spec.loader is None:
        raise CalibrationError(f"{script}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # the user's code may raise anything, sys.exit() included
        del sys.modules[module_name]
        raise CalibrationError(f"{script}: importing the data loader {describe_failure(err)}") from err
    loader = getattr(module, function_name, None)
    if loader is None:
        raise CalibrationError(f"{script}: no function '{function_name}' (write `{script}:NAME` for another one)")
    if not callable(loader):
        raise CalibrationError(f"{script}: '{function_name}' is a {type(loader).__name__}, not a function")
    return loader


def describe_failure(err: BaseException, after: str = "") -> str:
    """What a loader did, e.g. "failed: ValueError: bad path" or "called sys.exit(0) after 2 feeds; ..."."""
    if isinstance(err, SystemExit):  # sys.exit(...) and raise SystemExit(...) alike
        return (f"called sys.exit({err.code!r}) (SystemExit){after}; a data loader must return or yield its feeds, "
                "not end the process")
    if after:
        return f"raised {type(err).__name__}{after}: {first_line(err)}"
    return f"failed: {type(err).__name__}: {first_line(err)}"
