"""The `revgan-med` command line.

Each subcommand lives in its own module in this package with `HELP` (one line), `ORDER` (position
in `--help`), `add_arguments(parser)` and `run(args) -> int`. The modules import only argparse at
import time and the heavy libraries (torch, MONAI) inside `run`, so `--help` is instant; `run` is a
thin wrapper over a typed library function, so the CLI and the Python API are the same thing.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from collections.abc import Sequence

from revgan_med import __version__
from revgan_med.config import ConfigError


def add_tilt_argument(parser: argparse.ArgumentParser) -> None:
    """``--tilt``, shared by the commands that read CT series (`revgan_med.io.tilt`)."""
    parser.add_argument(
        "--tilt", default="correct", choices=("correct", "refuse"),
        help="gantry-tilted CT: resample onto an orthogonal grid (default) or refuse the series",
    )  # fmt: skip


def _command_modules() -> list:
    modules = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
    return sorted(modules, key=lambda m: m.ORDER)


class _Version(argparse.Action):
    """``--version``: imports torch only when asked, so `--help` stays instant."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        import torch

        cuda = torch.version.cuda or "none (CPU build)"
        available = f", {torch.cuda.device_count()} GPU(s) visible" if torch.cuda.is_available() else ""
        print(f"revgan-med {__version__} (torch {torch.__version__}, CUDA {cuda}{available})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revgan-med",
        description="Reversible 3D GANs for CT / dMRI super-resolution and CT kernel conversion.",
    )
    parser.add_argument("--version", action=_Version, help="show the revgan-med, torch and CUDA versions")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        name = module.__name__.rsplit(".", 1)[1]
        cmd = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failures in the work, 2 usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            # numpy/nibabel RuntimeWarnings (overflow, invalid value) would reach the terminal as noise:
            # every stage refuses non-finite volumes itself, with one line naming the file
            warnings.simplefilter("ignore", RuntimeWarning)
            return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"revgan-med {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"revgan-med {args.command}: error: {exc}", file=sys.stderr)
        return 1
