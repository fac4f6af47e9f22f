"""Benchmarks: memory and time of the networks (one subcommand per module in `revgan_med.benchmarks`).

`memory` is the 3D version of thesis Table 7: parameter, saved-activation and peak memory and step
time of one generator + discriminator training step for growing core depth, memory-saving vs plain
autograd vs MemCNN (when installed). Every benchmark prints a table; `--json FILE` writes the numbers.

Examples:
  revgan-med benchmark memory
  revgan-med benchmark memory --depths 2,8,32 --size 48 --width 16 --json memory.json
  revgan-med benchmark memory --help
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

HELP = "memory / speed benchmarks of the networks (prints tables, --json for machines)"
ORDER = 80


def _benchmark_modules() -> dict[str, object]:
    import revgan_med.benchmarks as package

    return {
        m.name: importlib.import_module(f"{package.__name__}.{m.name}")
        for m in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name)
        if not m.name.startswith("_")
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module in _benchmark_modules().items():
        cmd = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_benchmark_run=module.run)


def run(args: argparse.Namespace) -> int:
    return args._benchmark_run(args)
