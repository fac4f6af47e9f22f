"""Benchmarks for `revgan-med benchmark NAME`; each module has `HELP`, `add_arguments(parser)`, `run(args)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_training_run_arguments(
    parser: argparse.ArgumentParser, *, steps: int, lr: float, linear_kernel: list[int] | None = None
) -> None:
    """The options shared by the experiments that train small models (`reggan`, `selfinverse`)."""
    parser.add_argument(
        "--steps", type=int, default=steps, help="training steps per run (default: %(default)s)"
    )
    parser.add_argument("--width", type=int, default=8, help="generator width (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=lr, help="Adam learning rate (default: %(default)s)")
    parser.add_argument(
        "--residual", action=argparse.BooleanOptionalAction, default=True,
        help="generator = input + learned correction, identity when untrained (default: on)",
    )  # fmt: skip
    parser.add_argument(
        "--linear-kernel", type=_kernel, default=linear_kernel, metavar="X,Y,Z",
        help=f"the generator's linear paths, model.linear_kernel, or none (default: {linear_kernel})",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")


def _kernel(text: str) -> list[int] | None:
    if text.lower() == "none":
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z odd integers, got {text!r}") from None


def write_json(path: Path | None, result: Any) -> None:
    """Write a benchmark's numbers to `path` (atomically) when `--json` was given."""
    if path is not None:
        from revgan_med.io.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
