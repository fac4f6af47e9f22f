from __future__ import annotations

import subprocess
import sys

import pytest

from revgan_med import __version__
from revgan_med.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    import torch

    printed = capsys.readouterr().out
    assert __version__ in printed and f"torch {torch.__version__}" in printed and "CUDA" in printed


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_every_subcommand_has_help_with_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices, "no subcommands registered"
    for name, cmd in sub.choices.items():
        text = cmd.format_help()
        assert "example" in text.lower(), f"`revgan-med {name} --help` shows no example"


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "revgan_med", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout
