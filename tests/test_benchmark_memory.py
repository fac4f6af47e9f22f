"""`revgan-med benchmark memory` on tiny sizes: table and JSON structure, flat vs growing saved bytes."""

from __future__ import annotations

import json

import pytest

from revgan_med.cli import main


@pytest.mark.slow
def test_memory_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "memory.json"
    args = ["benchmark", "memory", "--size", "16", "--width", "4", "--depths", "2,4", "--check-depth", "4",
            "--repeats", "0", "--threads", "1", "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["failures"] == []
    variants = {r["variant"] for r in result["runs"]}
    assert {"memory-saving", "plain"} <= variants
    assert len(result["runs"]) == 2 * len(variants)
    for r in result["runs"]:
        assert set(r) == {"variant", "depth", "params_mib", "saved_mib", "peak_mib", "step_s"}
        assert r["step_s"] > 0 and r["params_mib"] > 0
    saved = {(r["variant"], r["depth"]): r["saved_mib"] for r in result["runs"]}
    assert saved["memory-saving", 4] == saved["memory-saving", 2]
    assert saved["plain", 4] > 1.5 * saved["plain", 2]
    # a 4-block core with 4 channels: the depth-4 increase of plain autograd is at least the 2 extra
    # blocks' two branch inputs and conv outputs (16³ voxels, 2 channels, float32 each)
    assert saved["plain", 4] - saved["plain", 2] >= 2 * 2 * 2 * 16**3 * 2 * 4 / 2**20
    check = result["check"]
    assert check["inverse_error"] < 1e-4 and check["param_grad_rel"] < 1e-4
    # in float64 the rebuilt activations leave only float64 rounding in the gradients
    assert check["param_grad_rel_float64"] < 1e-10 and check["float32_floor"] < 1e-4
    assert check.get("memcnn_param_grad_rel", 0.0) < 1e-4  # MemCNN on the same blocks, when installed
    assert result["ratios"]["memory-saving"]["saved"] == pytest.approx(1.0)
    assert "memory-saving" in table and "plain" in table and "max|C⁻¹(C(x)) − x|" in table


def test_bad_depths_is_a_usage_error(capsys):
    assert main(["benchmark", "memory", "--depths", "two"]) == 1
    assert "--depths" in capsys.readouterr().err
