"""`python -m onnxq_cli`: the same as the `onnxq` console script."""

from __future__ import annotations

from .launch import main

if __name__ == "__main__":
    main()
