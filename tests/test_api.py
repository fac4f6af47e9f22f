"""The Python API: README's example runs as written, and the names it advertises behave."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import revgan_med
from revgan_med.io import load_volume, save_volume

README = Path(__file__).resolve().parents[1] / "README.md"
WINDOW = {"kind": "ct-window", "window": [-1150.0, 350.0]}


def _python_block(after_heading: str) -> str:
    """The first ```python block under `after_heading` in README.md."""
    text = README.read_text()
    section = text[text.index(after_heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {after_heading!r}"
    return match.group(1)


@pytest.fixture
def exported_sr(tmp_path: Path) -> Path:
    """A tiny ×(1, 1, 2) super-resolution model exported as ``ct_sr.pt``."""
    from revgan_med.checkpoints import save_checkpoint
    from revgan_med.config import config_from_dict
    from revgan_med.export import export_model
    from revgan_med.networks import build_generator

    config = config_from_dict({"task": "ct-sr", "data": {"patch_size": [16, 16, 16], "factors": [1, 1, 2],
                                                         "datalist": str(tmp_path / "absent.json")},
                               "model": {"generator": "rev_srcnn3d", "width": 4, "depth": 1}})  # fmt: skip
    torch.manual_seed(0)
    generator = build_generator("rev_srcnn3d", in_channels=1, out_channels=1, width=4, depth=1)
    payload = {"config": config.to_dict(), "intensity": dict(WINDOW), "step": 3,
               "models": {"generator": generator.state_dict()}}  # fmt: skip
    save_checkpoint(tmp_path / "best.pt", payload)
    return export_model(tmp_path / "best.pt", tmp_path / "ct_sr.pt")


def test_readme_example_runs(exported_sr: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    rng = np.random.default_rng(0)
    hr = (rng.normal(size=(12, 12, 16)) * 300 - 300).astype(np.float32)
    save_volume(hr, np.eye(4), tmp_path / "hr.nii.gz")
    save_volume(hr.reshape(12, 12, 8, 2).mean(-1), np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "thick.nii.gz")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_python_block("### Python API"), namespace)  # noqa: S102 (README's own example)
    out, back = namespace["out"], namespace["back"]
    assert out.array.shape == hr.shape and out.error_map.shape == hr.shape
    assert back.array.shape == (12, 12, 8)  # the inverse goes back to the thick-slice grid
    np.testing.assert_array_equal(load_volume(tmp_path / "sr.nii.gz")[0], out.array)
    assert "psnr" in capsys.readouterr().out


def test_translate_array_matches_path_and_evaluate_matches_hand_values(exported_sr: Path) -> None:
    model = revgan_med.load_model(exported_sr, device="cpu")
    rng = np.random.default_rng(1)
    thick = (rng.normal(size=(10, 9, 6)) * 200).astype(np.float32)
    out = revgan_med.translate(model, thick, np.eye(4))
    assert out.array.shape == (10, 9, 12) and out.error_map is None
    with pytest.raises(ValueError, match="affine"):
        revgan_med.translate(model, thick)
    reference = out.array + 10.0  # every voxel 10 HU off, all inside a wide window
    metrics = revgan_med.evaluate(out, reference, window=(-5000.0, 5000.0))
    assert metrics["mae"] == pytest.approx(10.0, abs=1e-3)
    assert metrics["psnr"] == pytest.approx(10 * np.log10(10000.0**2 / 100.0), abs=1e-3)


def test_api_is_lazy_and_lists_its_names() -> None:
    code = "import sys, revgan_med; assert 'torch' not in sys.modules; print(sorted(revgan_med.__all__))"
    printed = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "translate" in printed and "load_model" in printed
    with pytest.raises(AttributeError):
        revgan_med.no_such_name  # noqa: B018
