"""Gantry-tilted CT series: resampled onto the orthogonal grid (hand-built oracle, dcm2niix) or refused."""

from __future__ import annotations

import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_io_dicom import write_series

from revgan_med.io import VolumeError, load_volume
from revgan_med.io.dwi import dcm2niix_executable


def test_tilted_series_is_resampled_onto_the_orthogonal_grid(tmp_path, rng):
    # an object F on the orthogonal grid; slice k is acquired shifted by one row (0.5 mm along y)
    truth = rng.integers(-1000, 2000, size=(7, 12, 5)).astype(np.int16)  # (slice, row, column)
    acquired = np.stack([truth[k, k : k + 5] for k in range(7)])
    positions = [(0.0, 0.5 * k, 2.5 * k) for k in range(7)]
    write_series(tmp_path / "s", acquired, positions, rng=rng, spacing=(0.5, 0.7))
    notes: list[str] = []
    volume, affine = load_volume(tmp_path / "s", notes=notes)
    assert notes == [f"gantry tilt {np.degrees(np.arctan(0.5 / 2.5)):.2f} deg corrected"]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    np.testing.assert_allclose(lps, [[0.7, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]], atol=1e-6)
    for k in range(7):  # output row j of slice k is acquired row j - k: known where that exists
        np.testing.assert_array_equal(volume[:, k:, k], truth[k, k:5].T)
        assert (volume[:, :k, k] == volume.min()).all()  # not covered by the acquired slice


def test_tilt_refuse_keeps_refusing(tmp_path, rng):
    stack = rng.integers(-1000, 2000, size=(7, 6, 5)).astype(np.int16)
    write_series(tmp_path / "s", stack, [(0.0, 0.9 * k, 2.5 * k) for k in range(7)], rng=rng)
    with pytest.raises(VolumeError, match="gantry tilt of 19.80 degrees") as info:
        load_volume(tmp_path / "s", tilt="refuse")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="tilt 'maybe'"):
        load_volume(tmp_path / "s", tilt="maybe")


def test_uneven_tilt_stays_refused(tmp_path, rng):
    stack = rng.integers(-1000, 2000, size=(7, 6, 5)).astype(np.int16)
    sideways = [0.0, 0.9, 1.8, 2.9, 3.6, 4.5, 5.4]  # not a constant step: no single shear explains it
    write_series(tmp_path / "s", stack, [(0.0, y, 2.5 * k) for k, y in enumerate(sideways)], rng=rng)
    with pytest.raises(VolumeError, match="scattered sideways"):
        load_volume(tmp_path / "s")


def _tilted_copy(source, folder, degrees: float, crop: slice) -> None:
    """The shared Philips CT cropped in-plane, each slice's origin sheared along the column axis by
    tan(tilt) per mm of depth and GantryDetectorTilt set (the sign dcm2niix's estimate agrees with)."""
    folder.mkdir()
    files = sorted(source.iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    row, col = np.asarray(datasets[0].ImageOrientationPatient, dtype=float).reshape(2, 3)
    depth = [np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(row, col) for ds in datasets]
    for file, ds, z in zip(files, datasets, depth, strict=True):
        spacing = np.asarray(ds.PixelSpacing, dtype=float)
        origin = np.asarray(ds.ImagePositionPatient, dtype=float) + crop.start * (
            spacing[1] * row + spacing[0] * col
        )
        origin -= np.tan(np.radians(degrees)) * (z - min(depth)) * col
        pixels = ds.pixel_array[crop, crop]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.GantryDetectorTilt = degrees
        ds.save_as(folder / file.name)


def test_tilt_correction_agrees_with_dcm2niix(shared_data, tmp_path):
    _tilted_copy(shared_data / "ct_chest_dicom_philips" / "dcm", tmp_path / "tilted", 10.0, slice(160, 352))
    volume, affine = load_volume(tmp_path / "tilted")
    untilted, untilted_affine = load_volume(shared_data / "ct_chest_dicom_philips" / "dcm")
    np.testing.assert_allclose(affine[:3, :3], untilted_affine[:3, :3], atol=1e-6)
    command = [dcm2niix_executable(), "-z", "n", "-f", "ref", "-o", str(tmp_path), str(tmp_path / "tilted")]
    subprocess.run(command, check=True, capture_output=True)
    corrected = sorted(tmp_path.glob("ref_Tilt*.nii"))
    assert corrected, "dcm2niix wrote no tilt-corrected volume"
    reference = np.asarray(nib.load(corrected[0]).dataobj, dtype=np.float32)[
        :, ::-1
    ]  # rows as DICOM stores them
    # dcm2niix pads the sheared rows; one row offset must align every slice (so the per-slice shear agrees)
    errors = []
    for offset in range(reference.shape[1] - volume.shape[1] + 1):
        ref = reference[:, offset : offset + volume.shape[1]]
        both = (ref > -1000) & (volume > -1000)  # both have data (neither is padding/air fill)
        errors.append((np.abs(ref[both] - volume[both]).mean(), both.mean()))
    mae, covered = min(errors)
    print(f"tilt vs dcm2niix: MAE {mae:.3f} HU over {covered:.1%} of voxels")
    assert mae < 1.0 and covered > 0.5  # HU, linear interpolation in both


def test_preprocess_labels_the_correction_and_tilt_refuse_fails_the_case(tmp_path, rng):
    from revgan_med.cli import main

    stack = rng.integers(-1000, 2000, size=(8, 6, 6)).astype(np.int16)
    write_series(tmp_path / "scans" / "tilted", stack, [(0.0, 0.5 * k, 2.5 * k) for k in range(8)], rng=rng)
    assert main(["preprocess", str(tmp_path / "scans"), str(tmp_path / "a"), "--task", "ct-sr"]) == 0
    description = nib.load(tmp_path / "a" / "tilted" / "target.nii.gz").header["descrip"].tobytes()
    assert b"gantry tilt 11.31 deg corrected" in description
    out = tmp_path / "b"
    assert main(["preprocess", str(tmp_path / "scans"), str(out), "--task", "ct-sr", "--tilt", "refuse"]) == 1
    assert "gantry tilt of 11.31 degrees" in (out / "report.csv").read_text()


def test_infer_labels_the_correction_and_can_refuse(tmp_path, rng):
    import torch

    from revgan_med.checkpoints import Model
    from revgan_med.inference_files import infer_path

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        inverse = forward

    stack = rng.integers(-1000, 300, size=(8, 6, 6)).astype(np.int16)
    write_series(tmp_path / "tilted", stack, [(0.0, 0.5 * k, 2.5 * k) for k in range(8)], rng=rng)
    model = Model(Identity(), "ct-kernel", {"kind": "ct-window", "window": [-1150.0, 350.0]}, (8, 8, 8))
    infer_path(model, tmp_path / "tilted", tmp_path / "out.nii.gz")
    out = nib.load(tmp_path / "out.nii.gz")
    assert b"tilt corrected" in out.header["descrip"].tobytes()
    np.testing.assert_allclose(out.get_fdata(), load_volume(tmp_path / "tilted")[0], atol=0.05)
    with pytest.raises(VolumeError, match="gantry tilt"):
        infer_path(model, tmp_path / "tilted", tmp_path / "refused.nii.gz", tilt="refuse")
