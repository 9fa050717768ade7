"""Named CuPy kernels (placeholder while being written)."""
from __future__ import annotations


def cudnn_version() -> int | None:
    return None
