"""The recipes in pipelines/: each chains preprocess → train → infer → evaluate end to end on tiny data."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from revgan_med.data.phantom import make_phantom
from revgan_med.io import load_volume, save_volume

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
RECIPES = ("ct_superresolution.sh", "ct_kernel_conversion.sh", "dmri_superresolution.sh")
# a model small enough for seconds on a CPU: the recipes pass TRAIN_SET on as --set overrides
TINY = (
    "train.steps=2 train.val_every=2 train.checkpoint_every=2 train.log_every=1 train.decay_start=1 "
    "model.width=4 model.depth=1 model.disc_width=4 data.patch_size=[24,24,24] data.samples_per_volume=1 "
    "data.num_workers=0 infer.target_size=12 infer.context_size=24"
)


def _run(recipe: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OUTPUT_DIR": str(tmp_path / "out"),
        "DEVICE": "cpu",
        "TRAIN_SET": TINY,
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run(
        ["bash", str(PIPELINES / recipe)], env=environ, capture_output=True, text=True, timeout=600
    )


def _metrics(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(path.open()))
    assert rows, f"{path} is empty"
    return rows


def _assert_ran(result: subprocess.CompletedProcess, out: Path, methods: set[str]) -> list[dict[str, str]]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in ("1/4 preprocess", "2/4 train", "3/4 infer", "4/4 evaluate"):
        assert step in result.stdout
    rows = _metrics(out / "metrics.csv")
    assert {r["method"] for r in rows} == {"prediction", *methods}
    for row in rows:
        assert np.isfinite(float(row["mae"])) and np.isfinite(float(row["psnr"]))
    assert any(out.joinpath("figures").glob("*.png"))
    assert (out / "run" / "checkpoints" / "last.pt").is_file()
    return rows


def _phantom(path: Path, seed: int, kernel: str | None = None) -> None:
    hu, affine = make_phantom((32, 32, 32), (1.5, 1.5, 1.5), seed=seed, kernel=kernel)
    save_volume(hu, affine, path)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_are_strict_bash_scripts(recipe):
    text = (PIPELINES / recipe).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(PIPELINES / recipe, os.X_OK)
    for var in ("INPUT_DIR", "OUTPUT_DIR", "CONFIG", "DEVICE"):
        assert f"{var}=${{{var}:-" in text, f"{recipe}: {var} has no default"
    syntax = subprocess.run(["bash", "-n", str(PIPELINES / recipe)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


@pytest.mark.slow
def test_ct_superresolution_pipeline(tmp_path):
    scans = tmp_path / "scans"
    for seed in range(3):
        _phantom(scans / f"ct{seed}.nii.gz", seed)
    before = {p: p.read_bytes() for p in scans.iterdir()}
    result = _run("ct_superresolution.sh", tmp_path, INPUT_DIR=str(scans))
    out = tmp_path / "out"
    rows = _assert_ran(result, out, {"trilinear", "tricubic"})
    case = rows[0]["case"]
    prediction, affine = load_volume(out / "predictions" / f"{case}.nii.gz")
    reference, ref_affine = load_volume(out / "prep" / case / "target.nii.gz")
    assert prediction.shape == reference.shape and np.allclose(affine, ref_affine)  # back on the HR grid
    assert {p: p.read_bytes() for p in scans.iterdir()} == before  # inputs untouched
    # a second run resumes: cases are skipped and training continues from last.pt without error
    again = _run("ct_superresolution.sh", tmp_path, INPUT_DIR=str(scans))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped" in again.stdout


@pytest.mark.slow
def test_ct_kernel_conversion_pipeline(tmp_path):
    pairs = tmp_path / "pairs"
    for seed in range(3):
        _phantom(pairs / f"case{seed}" / "source.nii.gz", seed, kernel="smooth")
        _phantom(pairs / f"case{seed}" / "target.nii.gz", seed, kernel="sharp")
    result = _run("ct_kernel_conversion.sh", tmp_path, INPUT_DIR=str(pairs))
    _assert_ran(result, tmp_path / "out", {"identity"})


@pytest.mark.slow
def test_dmri_superresolution_pipeline(tmp_path):
    # synthetic 6-channel DTI (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz in mm²/s) inside an ellipsoidal "brain"
    rng = np.random.default_rng(0)
    shape = (32, 32, 24)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    brain = (grid**2 / np.array([0.8, 0.9, 0.8]) ** 2).sum(-1) < 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for case in range(3):
        base = np.array([1.0, 0.1, 0.8, 0.05, 0.1, 0.7]) * 1e-3
        wave = 1 + 0.3 * np.sin(3 * grid[..., :1] + case) * np.cos(2 * grid[..., 1:2])
        dti = base * wave + rng.normal(0, 2e-5, (*shape, 6))
        save_volume((dti * brain[..., None]).astype(np.float32), affine, tmp_path / "dti" / f"s{case}.nii.gz")
    result = _run("dmri_superresolution.sh", tmp_path, INPUT_DIR=str(tmp_path / "dti"))
    rows = _assert_ran(result, tmp_path / "out", {"trilinear", "tricubic"})
    assert all(np.isfinite(float(r["rmse_interior"])) for r in rows)


def test_a_usage_error_stops_the_pipeline(tmp_path):
    missing = _run("ct_superresolution.sh", tmp_path, INPUT_DIR=str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert "nowhere" in missing.stderr and "input folder not found" in missing.stderr
    assert "2/4 train" not in missing.stdout
