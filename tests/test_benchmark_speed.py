"""The speed benchmark runs, its three sliding windows agree, and the CLI prints the table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from revgan_med.benchmarks.speed import format_table, run_benchmark
from revgan_med.cli import main


def test_three_sliding_windows_agree_on_a_tiny_volume() -> None:
    result = run_benchmark(shape=(20, 18, 11), width=4, depth=1, context=16, target=8, batch_size=3)
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["revgan-med", "naive", "monai", "forward only"]
    assert result["identical"] and result["windows"] == 3 * 3 * 2
    assert all(r["max_abs_diff"] <= 1e-5 for r in result["rows"] if r["max_abs_diff"] is not None)
    assert "outputs identical within 1e-05: yes" in format_table(result)


def test_cli_writes_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "speed.json"
    args = ["--shape", "12,12,9", "--width", "4", "--depth", "1", "--context", "8", "--target", "4"]
    assert main(["benchmark", "speed", *args, "--json", str(out)]) == 0
    assert "naive" in capsys.readouterr().out
    assert json.loads(out.read_text())["identical"] is True
