"""The speed benchmark runs, its three sliding windows agree, and the CLI prints the table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from revgan_med.benchmarks.speed import format_table, run_benchmark
from revgan_med.cli import main


def test_three_sliding_windows_agree_on_a_tiny_volume() -> None:
    result = run_benchmark(shape=(20, 18, 11), width=4, depth=1, context=16, target=8, batch_size=3)
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["revgan-med", "naive", "monai", "forward only", "auto windows", "one window"]
    assert result["identical"] and result["windows"] == 3 * 3 * 2
    assert all(r["max_abs_diff"] <= 1e-5 for r in result["rows"] if r["method"] in ("naive", "monai"))
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["one window"]["vs_one_window"] == 1.0
    assert rows["naive"]["vs_one_window"] == rows["naive"]["seconds"] / rows["one window"]["seconds"]
    # the whole 20x18x11 volume with the rev_resnet3d margin (depth 1: 15 voxels) fits one window
    assert result["auto_target"] == [20, 18, 11] and result["auto_context"] == [50, 48, 41]
    assert "naive and monai identical within 1e-05: yes" in format_table(result)


def test_cli_writes_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "speed.json"
    args = ["--shape", "12,12,9", "--width", "4", "--depth", "1", "--context", "8", "--target", "4"]
    assert main(["benchmark", "speed", *args, "--json", str(out)]) == 0
    assert "naive" in capsys.readouterr().out
    assert json.loads(out.read_text())["identical"] is True
