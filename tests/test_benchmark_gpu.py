"""The device check: its AMP measurement on a tiny kernel model, and the whole check on the CPU."""

from __future__ import annotations

import pytest
import torch

from revgan_med.benchmarks import gpu


def test_amp_keeps_a_kernel_model_within_one_hu_of_float32():
    smooth, sharp, affine = gpu._kernel_pair(None)  # simulated pair, 96x96x24
    model = gpu.kernel_model(smooth[:48, :48], sharp[:48, :48], steps=1, device=torch.device("cpu"), width=4)
    err = gpu.amp_error(model, smooth[:48, :48], affine)
    assert err["voxels"] > 0
    assert err["mean_hu"] <= gpu.AMP_MEAN_HU and err["p99_hu"] <= gpu.AMP_P99_HU


def test_failed_rows_fail_the_check():
    rows = [gpu._row("amp", True, "x"), gpu._row("memory", None, "-", "skipped"),
            gpu._row("infer", False, "y")]  # fmt: skip
    text = gpu.format_table({"device": "cpu", "torch": torch.__version__, "rows": rows, "ok": False})
    assert "FAIL" in text and "SKIP" in text and text.endswith("SOME CHECKS FAILED")


@pytest.mark.slow
def test_the_whole_check_runs_on_the_cpu_with_tiny_sizes(capsys):
    from revgan_med.cli import main

    # the kill + resume row takes minutes on a shared CPU; test_train_loop kills and resumes a run too
    code = main(["benchmark", "gpu", "--device", "cpu", "--infer-shape", "40,40,12", "--amp-steps", "2",
                 "--skip", "resume"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    for check in ("memory", "amp", "torchrun", "infer", "small-gpu"):
        assert check in out
    assert "skipped: CUDA only" in out and "all checks passed" in out
