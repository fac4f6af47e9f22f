"""Benchmarks for `revgan-med benchmark NAME`; each module has `HELP`, `add_arguments(parser)`, `run(args)`.

The research experiments (quality on real CT, RegGAN, self-inverse) are scripts in the repository's
top-level ``benchmarks/`` folder, not part of the package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path | None, result: Any) -> None:
    """Write a benchmark's numbers to `path` (atomically) when `--json` was given."""
    if path is not None:
        from revgan_med.io.atomic import atomic_write_text  # `revgan-med --help` loads this module

        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
