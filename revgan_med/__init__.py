"""revgan-med: reversible 3D GANs for medical volume super-resolution and CT kernel conversion.

The Python API (README, "Python API"): `load_model` (a checkpoint or an exported model file),
`translate` (a path, or an array + affine; either direction), `evaluate` (against a reference).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "evaluate", "load_model", "translate"]


def __getattr__(name: str) -> Any:
    """Import the API on first use: `revgan-med --help` must not pay for torch."""
    if name in ("evaluate", "load_model", "translate"):
        from revgan_med import api

        return getattr(api, name)
    raise AttributeError(f"module 'revgan_med' has no attribute {name!r}")
