"""Error maps: calibration against hand-computed values, flip disagreement against equivariance oracles."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from revgan_med.checkpoints import Model
from revgan_med.errormap import calibration, flip_disagreement
from revgan_med.inference import infer_volume
from revgan_med.io import load_volume, save_volume

WINDOW = {"kind": "ct-window", "window": [-1000.0, 1000.0]}


class Pointwise(torch.nn.Module):
    """x + 0.1·x² per voxel: equivariant to every mirroring and axis swap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * x**2

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y


class ShiftX(torch.nn.Module):
    """Moves the content one voxel towards +x (edge value repeated): not equivariant to mirroring x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 1, 0), mode="replicate")[:, :, :-1]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y


def _model(generator: torch.nn.Module, factors=(1, 1, 1), ensemble: bool = False) -> Model:
    task = "ct-sr" if max(factors) > 1 else "ct-kernel"
    return Model(generator, task, dict(WINDOW), (16, 16, 16), factors=factors, target_size=8,
                 ensemble=ensemble)


def test_calibration_matches_hand_computed_values(rng: np.random.Generator) -> None:
    reference = rng.normal(size=(16, 16, 16)) * 100
    error = np.zeros((16, 16, 16))
    error[:8, :8, :8] = 10.0  # one 8³ block of 512 voxels is wrong by 10 HU
    prediction = reference + error
    k = round(0.05 * 16**3)  # 205 flagged voxels, all inside the wrong block
    exact = calibration(error, prediction, reference, window=(-1e4, 1e4))
    assert exact["top_mae"] == pytest.approx(10.0)
    assert exact["rest_mae"] == pytest.approx((512 - k) * 10.0 / (16**3 - k))
    assert exact["ratio"] == pytest.approx(exact["top_mae"] / exact["rest_mae"])
    assert exact["spearman"] == pytest.approx(1.0)
    upside_down = calibration(-error, prediction, reference)
    assert upside_down["top_mae"] == 0.0 and upside_down["spearman"] == pytest.approx(-1.0)
    # errors outside the window do not count: clipped, both sides agree
    clipped = calibration(error, reference + error + 500, np.full_like(reference, 2000.0), window=(-100, 100))
    assert clipped["top_mae"] == clipped["rest_mae"] == 0.0 and np.isnan(clipped["spearman"])
    with pytest.raises(ValueError, match="shapes differ"):
        calibration(error[:8], prediction, reference)


@pytest.mark.parametrize("factors", [(1, 1, 1), (2, 2, 2)])
def test_an_equivariant_model_has_a_zero_map(factors, rng: np.random.Generator) -> None:
    model = _model(Pointwise(), factors)
    array = (rng.normal(size=(12, 12, 10)) * 300).astype(np.float32)
    prediction = infer_volume(model, array, np.eye(4)).array
    emap = flip_disagreement(model, array, np.eye(4), prediction)
    assert emap.shape == prediction.shape
    np.testing.assert_allclose(emap, 0.0, atol=1e-3)  # float32 HU rounding only


def test_a_model_that_is_not_equivariant_is_flagged_where_it_acts() -> None:
    array = np.full((20, 12, 10), -500.0, np.float32)
    array[10:] = 500.0  # a step along x at x = 10
    model = _model(ShiftX())
    prediction = infer_volume(model, array, np.eye(4)).array
    emap = flip_disagreement(model, array, np.eye(4), prediction)
    # plain: the edge moves to x = 11; mirrored in x: to x = 9; the others leave it at 11 or 10
    changed = np.zeros(20, bool)
    changed[9:11] = True
    assert (emap[changed] > 100).all() and np.allclose(emap[~changed], 0.0)


def test_the_flip_ensemble_averages_the_five_hand_computed_predictions(tmp_path: Path) -> None:
    from revgan_med.api import translate
    from revgan_med.inference_files import infer_path

    array = np.full((20, 12, 10), -500.0, np.float32)
    array[10:] = 500.0  # a step along x at x = 10
    model = _model(ShiftX())
    # out[x] = in[x − 1] as given and mirrored in y or z; in[x + 1] mirrored in x; in[x] x/y-swapped
    # (ShiftX then acts along y, where the volume is constant): x = 9 → (−500·4 + 500) / 5 = −300,
    # x = 10 → (−500·3 + 500·2) / 5 = −100, every other slice keeps its value
    expected = array.copy()
    expected[9], expected[10] = -300.0, -100.0
    np.testing.assert_allclose(translate(model, array, np.eye(4), ensemble=True).array, expected, atol=1e-3)
    scan, out = tmp_path / "step.nii.gz", tmp_path / "out.nii.gz"
    save_volume(array, np.eye(4), scan)
    infer_path(model, scan, out, ensemble=True)
    np.testing.assert_allclose(load_volume(out)[0], expected, atol=1e-3)
    # a model whose checkpoint asks for the ensemble (infer.ensemble) gets it unless the caller says no
    by_default = _model(ShiftX(), ensemble=True)
    shifted = np.concatenate([array[:1], array[:-1]])  # the plain ShiftX output: the step at x = 11
    np.testing.assert_allclose(translate(by_default, array, np.eye(4)).array, expected, atol=1e-3)
    np.testing.assert_allclose(translate(by_default, array, np.eye(4), ensemble=False).array, shifted)
    infer_path(by_default, scan, tmp_path / "default.nii.gz")
    np.testing.assert_allclose(load_volume(tmp_path / "default.nii.gz")[0], expected, atol=1e-3)
    np.testing.assert_allclose(translate(model, array, np.eye(4)).array, shifted)  # and without it, not


def _untrained_checkpoint(path: Path, *overrides: str) -> Path:
    """An untrained rev_srcnn3d kernel checkpoint (width 4, seed 0: not flip-equivariant) at `path`."""
    from revgan_med.checkpoints import save_checkpoint
    from revgan_med.config import config_from_dict
    from revgan_med.networks import build_generator

    config = config_from_dict({"task": "ct-kernel", "data": {"patch_size": [16, 16, 16]},
                               "model": {"generator": "rev_srcnn3d", "width": 4, "depth": 1}},
                              overrides)  # fmt: skip
    torch.manual_seed(0)
    generator = build_generator("rev_srcnn3d", in_channels=1, out_channels=1, width=4, depth=1)
    payload = {"config": config.to_dict(), "intensity": dict(WINDOW), "step": 0,
               "models": {"generator": generator.state_dict()}}  # fmt: skip
    return save_checkpoint(path, payload)


def test_infer_uses_the_checkpoints_ensemble_default_and_says_so(tmp_path: Path, capsys) -> None:
    """``infer.ensemble: true`` in the checkpoint: ``infer`` writes what ``--ensemble`` writes and says
    so on stderr; ``--no-ensemble`` writes the plain output of a checkpoint without the key."""
    from revgan_med.cli import main

    on = _untrained_checkpoint(tmp_path / "on.pt", "infer.ensemble=true")
    off = _untrained_checkpoint(tmp_path / "off.pt")
    scan = tmp_path / "scan.nii.gz"
    volume = (np.random.default_rng(0).normal(size=(16, 16, 16)) * 200).astype(np.float32)
    save_volume(volume, np.eye(4), scan)
    outputs = {}
    for name, checkpoint, flag in (("default", on, []), ("no", on, ["--no-ensemble"]),
                                   ("plain", off, []), ("asked", off, ["--ensemble"])):  # fmt: skip
        outputs[name] = tmp_path / f"{name}.nii.gz"
        argv = ["infer", "--checkpoint", str(checkpoint), "-i", str(scan), "-o", str(outputs[name])]
        assert main([*argv, "--device", "cpu", *flag]) == 0
        said = "flip ensemble on" in capsys.readouterr().err
        assert said == (name == "default"), name
    arrays = {name: load_volume(path)[0] for name, path in outputs.items()}
    np.testing.assert_allclose(arrays["default"], arrays["asked"], atol=1e-4)
    np.testing.assert_allclose(arrays["no"], arrays["plain"], atol=1e-4)
    assert not np.allclose(arrays["default"], arrays["plain"])
    assert b"flip-ensemble" in nib.load(outputs["default"]).header["descrip"].tobytes()


def test_infer_and_evaluate_error_map_cli(tmp_path: Path, capsys) -> None:
    from revgan_med.cli import main

    checkpoint = _untrained_checkpoint(tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    scan, reference = tmp_path / "scan.nii.gz", tmp_path / "ref.nii.gz"
    save_volume((rng.normal(size=(16, 16, 16)) * 200).astype(np.float32), np.eye(4), scan)
    save_volume((rng.normal(size=(16, 16, 16)) * 200).astype(np.float32), np.eye(4), reference)
    out, emap = tmp_path / "out.nii.gz", tmp_path / "map.nii.gz"
    argv = ["infer", "--checkpoint", str(checkpoint), "-i", str(scan), "-o", str(out), "--device", "cpu"]
    assert main([*argv, "--error-map", str(emap)]) == 0
    assert "error map: mean" in capsys.readouterr().out
    assert load_volume(emap)[0].shape == load_volume(out)[0].shape == (16, 16, 16)
    assert main([*argv, "--error-map", str(emap), "--consistency-map", str(tmp_path / "c.nii.gz")]) == 2
    plain, ensemble = tmp_path / "plain.nii.gz", tmp_path / "ensemble.nii.gz"
    assert main([*argv[:-3], str(plain), "--device", "cpu"]) == 0
    assert main([*argv[:-3], str(ensemble), "--device", "cpu", "--ensemble", "--error-map", str(emap)]) == 0
    capsys.readouterr()
    # an untrained network is not flip-equivariant: the ensemble differs from the plain output
    assert b"flip-ensemble" in nib.load(ensemble).header["descrip"].tobytes()
    assert not np.allclose(load_volume(ensemble)[0], load_volume(plain)[0])
    evaluate = ["evaluate", "--prediction", str(out), "--reference", str(reference), "--window=-1000,1000"]
    assert main([*evaluate, "--error-map", str(emap)]) == 0
    printed = capsys.readouterr().out
    expected = calibration(load_volume(emap)[0], load_volume(out)[0], load_volume(reference)[0],
                           window=(-1000, 1000))  # fmt: skip
    assert "error map calibration" in printed and f"{expected['ratio']:.2f}" in printed
    assert main([*evaluate, "--error-map", str(tmp_path / "missing.nii.gz")]) == 1
