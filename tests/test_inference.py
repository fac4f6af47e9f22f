"""Sliding-window oracles, super-resolution geometry, outputs (NIfTI / DICOM), consistency maps, folders."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from revgan_med.checkpoints import Model
from revgan_med.data.degradation import thick_slice
from revgan_med.inference import consistency_summary, infer_volume
from revgan_med.inference_files import infer_inputs, infer_path
from revgan_med.io import load_volume, save_volume
from revgan_med.sharding import parse_shard, shard_items
from revgan_med.tiling import sliding_window_predict

WINDOW = {"kind": "ct-window", "window": [-1150.0, 350.0]}


class Shift(torch.nn.Module):
    """forward: x + c, inverse: y − c (in network units); c = 0 is the identity."""

    def __init__(self, c: float = 0.0) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y - self.c


class Coupled(torch.nn.Module):
    """Exactly invertible but not pointwise: additive coupling of odd z slices on a conv of even ones."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = torch.nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[..., ::2], x[..., 1::2]
        return torch.stack([a, b + 0.5 * torch.tanh(self.f(a))], dim=-1).flatten(-2)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b = y[..., ::2], y[..., 1::2]
        return torch.stack([a, b - 0.5 * torch.tanh(self.f(a))], dim=-1).flatten(-2)


def toy_model(generator: torch.nn.Module, *, factors=(1, 1, 1), patch=16, target=8) -> Model:
    task = "ct-sr" if max(factors) > 1 else "ct-kernel"
    return Model(generator, task, dict(WINDOW), (patch,) * 3, factors=factors, target_size=target)


@pytest.mark.parametrize(
    ("shape", "target", "context", "batch"),
    [
        ((1, 1, 20, 33, 17), 16, 32, 3),  # odd sizes, 20 slices, smaller than the context
        ((2, 1, 37, 9, 41), 8, 24, 4),  # batch of 2 volumes, an axis thinner than the target
        ((1, 2, 5, 6, 7), 4, 16, 1),  # tiny, two channels
        ((1, 1, 30, 30, 30), (8, 10, 6), (16, 20, 13), 2),  # anisotropic, odd context margin
    ],
)
def test_add_one_comes_back_exactly(shape, target, context, batch) -> None:
    x = torch.randn(shape)
    y = sliding_window_predict(lambda t: t + 1, x, target_size=target, context_size=context, batch_size=batch)
    assert y.shape == x.shape and torch.equal(y, x + 1)


def test_stitching_is_seamless_for_a_local_operator() -> None:
    # a 3×3×3 convolution depends on its neighbourhood: only a centred context reproduces the
    # whole-volume result at every voxel (tile edges would differ if a window edge were kept)
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 23, 19, 20)
    y = sliding_window_predict(conv, x, target_size=8, context_size=16, batch_size=5)
    expected = F.conv3d(F.pad(x, (1,) * 6, mode="replicate"), conv.weight, conv.bias)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


def test_window_arguments_are_checked() -> None:
    x = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="must not exceed"):
        sliding_window_predict(lambda t: t, x, target_size=16, context_size=8)
    with pytest.raises(ValueError, match="keep the batch and spatial size"):
        sliding_window_predict(lambda t: t[..., :4], x, target_size=4, context_size=8)


def test_identity_keeps_geometry_and_hu(rng: np.random.Generator, oblique_affine: np.ndarray) -> None:
    hu = rng.uniform(-1100, 300, size=(21, 18, 13)).astype(np.float32)
    hu[0, 0, 0], hu[1, 0, 0] = -3000.0, 2500.0  # outside the window: kept by default
    result = infer_volume(toy_model(Shift()), hu, oblique_affine)
    np.testing.assert_allclose(result.array, hu, atol=1e-3)
    np.testing.assert_array_equal(result.affine, oblique_affine)
    raw = infer_volume(toy_model(Shift()), hu, oblique_affine, keep_out_of_window=False)
    assert raw.array[0, 0, 0] == pytest.approx(-1150.0) and raw.array[1, 0, 0] == pytest.approx(350.0)


def test_shift_model_adds_its_hu_offset(rng: np.random.Generator) -> None:
    hu = rng.uniform(-1000, 0, size=(12, 10, 9)).astype(np.float32)
    result = infer_volume(toy_model(Shift(0.1)), hu, np.eye(4), target_size=4, context_size=8)
    np.testing.assert_allclose(result.array, hu + 0.1 * 1500 / 2, atol=1e-2)  # 0.1 in [-1, 1] units


def test_super_resolution_round_trip_geometry(rng: np.random.Generator, oblique_affine: np.ndarray) -> None:
    factors = (2, 2, 4)
    hr = rng.uniform(-1000, 300, size=(18, 14, 24)).astype(np.float32)
    lr, lr_affine = thick_slice(hr, oblique_affine, factors)
    result = infer_volume(toy_model(Shift(), factors=factors), lr, lr_affine)
    assert result.array.shape == hr.shape
    np.testing.assert_allclose(result.affine, oblique_affine, atol=1e-9)
    # identity model on the nearest-upsampled grid: each HR voxel is its block's mean
    np.testing.assert_allclose(result.array[2 * 3 + 1, 2 * 2, 4 * 5 + 3], lr[3, 2, 5], atol=1e-3)
    back = infer_volume(toy_model(Shift(), factors=factors), hr, oblique_affine, direction="inverse")
    assert back.array.shape == lr.shape
    np.testing.assert_allclose(back.affine, lr_affine, atol=1e-9)
    np.testing.assert_allclose(back.array, lr, atol=1e-3)


def test_consistency_map_zero_for_invertible_model(rng: np.random.Generator) -> None:
    hu = rng.uniform(-1100, 300, size=(20, 17, 16)).astype(np.float32)
    result = infer_volume(toy_model(Coupled()), hu, np.eye(4), consistency=True)
    assert not np.allclose(result.array, hu, atol=1.0)  # the model does change the scan
    assert result.consistency.shape == hu.shape
    # exact away from the volume border; within the model's receptive field of it (1 voxel in x, y;
    # 2 in z here) the inverse sees padding of F(x) rather than F(padding of x)
    assert result.consistency[1:-1, 1:-1, 2:-2].max() < 1e-2


def test_consistency_summary_hand_values() -> None:
    diff = np.concatenate([np.zeros(90), np.full(10, 100.0)])
    s = consistency_summary(diff)
    assert s["mean"] == 10.0 and s["max"] == 100.0 and s["frac_gt_50"] == 0.1
    assert s["p95"] == 100.0


def test_infer_path_writes_derived_nifti_and_refuses_the_input(tmp_path: Path, oblique_affine) -> None:
    src = tmp_path / "in.nii.gz"
    save_volume(np.full((10, 9, 8), -500.0, np.float32), oblique_affine, src)
    out, cmap = tmp_path / "out.nii.gz", tmp_path / "cycle.nii.gz"
    summary = infer_path(toy_model(Shift(0.2)), src, out, consistency_map=cmap)
    img = nib.load(str(out))
    assert (
        b"derived" in img.header["descrip"].tobytes()
        and b"not for diagnosis" in img.header["descrip"].tobytes()
    )
    np.testing.assert_allclose(img.affine, oblique_affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.dataobj), -500.0 + 150.0, atol=1e-2)
    assert summary["max"] < 1e-2 and load_volume(cmap)[0].shape == (10, 9, 8)
    with pytest.raises(ValueError, match="refusing"):
        infer_path(toy_model(Shift()), src, src)


def test_dicom_output_is_a_readable_derived_series(tmp_path: Path, rng, oblique_affine) -> None:
    import pydicom
    import SimpleITK as sitk

    hu = np.round(rng.uniform(-1000, 300, size=(12, 10, 6))).astype(np.float32)
    src, out = tmp_path / "in.nii.gz", tmp_path / "series"
    save_volume(hu, oblique_affine, src)
    infer_path(toy_model(Shift()), src, out, output_format="dicom")
    files = sorted(out.iterdir())
    ds = pydicom.dcmread(files[0])
    assert len(files) == 6 and "DERIVED" in ds.ImageType and "derived" in ds.SeriesDescription
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out)))
    image = reader.Execute()
    # SimpleITK: LPS world; spacing / direction / origin must describe the input affine
    lps = np.diag([-1.0, -1.0, 1.0]) @ oblique_affine[:3, :3]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction * np.asarray(image.GetSpacing()), lps, atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), np.diag([-1, -1, 1]) @ oblique_affine[:3, 3], atol=1e-3)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image).transpose(2, 1, 0), hu, atol=0.5)
    with pytest.raises(ValueError, match="refusing"):
        infer_path(toy_model(Shift()), out, out / "again", output_format="dicom")


def test_folder_with_a_corrupt_file_reports_it_and_writes_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "scans"
    for name in ("a", "b"):
        save_volume(np.zeros((8, 8, 8), np.float32), np.eye(4), src / f"{name}.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"not a nifti file")
    report = infer_inputs(toy_model(Shift()), src, tmp_path / "out", progress=False)
    assert [p.name for p, _ in report.failed] == ["broken.nii.gz"] and "broken.nii.gz" in report.failed[0][1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    with pytest.raises(ValueError, match="refusing"):
        infer_inputs(toy_model(Shift()), src, src / "out", progress=False)


def test_shards_partition_the_sorted_list() -> None:
    items = list(range(11))
    parts = [shard_items(items, i, 4) for i in range(4)]
    assert sum(parts, []) == items and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    from revgan_med.checkpoints import save_checkpoint
    from revgan_med.config import config_from_dict
    from revgan_med.networks import build_generator

    config = config_from_dict(
        {
            "task": "ct-sr",
            "data": {"patch_size": [16, 16, 16], "factors": [1, 1, 2]},
            "model": {"width": 4, "depth": 1},
        }
    )
    torch.manual_seed(0)
    generator = build_generator("rev_resnet3d", in_channels=1, out_channels=1, width=4, depth=1)
    payload = {
        "config": config.to_dict(),
        "intensity": dict(WINDOW),
        "models": {"generator": generator.state_dict()},
    }
    return save_checkpoint(tmp_path / "model.pt", {**payload, "step": 0})


def test_infer_cli_file_folder_shard_and_consistency(tmp_path: Path, checkpoint: Path, capsys) -> None:
    from revgan_med.cli import main

    scans = tmp_path / "scans"
    for name in ("a", "b", "c"):
        save_volume(np.full((10, 9, 6), -700.0, np.float32), np.eye(4), scans / f"{name}.nii.gz")
    base = ["infer", "--checkpoint", str(checkpoint), "--device", "cpu"]
    one = tmp_path / "a_sr.nii.gz"
    args = [
        *base,
        "--input",
        str(scans / "a.nii.gz"),
        "--output",
        str(one),
        "--consistency-map",
        str(tmp_path / "c.nii.gz"),
    ]
    assert main(args) == 0
    assert load_volume(one)[0].shape == (10, 9, 12) and "|G(F(x))-x|" in capsys.readouterr().out
    assert main([*base, "--input", str(scans), "--output", str(tmp_path / "half"), "--shard", "1/2"]) == 0
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["b.nii.gz", "c.nii.gz"]
    (scans / "d.nii.gz").write_bytes(b"\x1f\x8b broken gzip")
    assert main([*base, "--input", str(scans), "--output", str(tmp_path / "all")]) == 1
    assert "d.nii.gz" in capsys.readouterr().err and len(list((tmp_path / "all").iterdir())) == 3
    assert main([*base, "--input", str(scans / "a.nii.gz"), "--output", str(scans / "a.nii.gz")]) == 1
    assert main([*base, "--input", str(scans), "--output", str(tmp_path / "x"), "--shard", "2/2"]) == 2
