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


def _tilted_copy(source, folder, degrees: float, crop: slice, *, ascending: bool = False) -> None:
    """The shared Philips CT cropped in-plane, each slice's origin sheared along the column axis by
    tan(tilt) per mm of depth and GantryDetectorTilt set (the sign dcm2niix's estimate agrees with).
    `ascending` renumbers InstanceNumber from the most inferior slice up (the series counts down)."""
    folder.mkdir()
    files = sorted(source.iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    row, col = np.asarray(datasets[0].ImageOrientationPatient, dtype=float).reshape(2, 3)
    depth = [np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(row, col) for ds in datasets]
    rank = np.argsort(np.argsort(depth))
    for file, ds, z, r in zip(files, datasets, depth, rank, strict=True):
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
        if ascending:
            ds.InstanceNumber = int(r) + 1
        ds.save_as(folder / file.name)


def _world_resample(volume, affine, points):
    """`volume` (voxel → RAS+ `affine`) linearly interpolated at RAS+ `points` (n, 3); NaN outside."""
    from scipy.ndimage import map_coordinates

    voxels = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    return map_coordinates(volume, voxels.T, order=1, mode="constant", cval=np.nan)


def _voxel_centres(shape, affine):
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1).reshape(-1, 3)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _body_mae(values, volume):
    """Mean |difference| where both are inside their grids and above air/padding, and that fraction."""
    values = values.reshape(volume.shape)
    both = np.isfinite(values) & (values > -1000) & (volume > -1000)
    return float(np.abs(values[both] - volume[both]).mean()), float(both.mean())


def test_tilt_correction_puts_each_voxel_where_the_slice_positions_say(shared_data, tmp_path):
    # oracle from the headers alone: the tilted copy's world is the untilted series' world sheared by
    # -tan(tilt) * depth along the column axis, so its value at a point is the untilted value there + that
    source = shared_data / "ct_chest_dicom_philips" / "dcm"
    degrees = 10.0
    _tilted_copy(source, tmp_path / "tilted", degrees, slice(160, 352))
    volume, affine = load_volume(tmp_path / "tilted")
    untilted, untilted_affine = load_volume(source)
    np.testing.assert_allclose(affine[:3, :3], untilted_affine[:3, :3], atol=1e-6)
    column, normal = (untilted_affine[:3, a] / np.linalg.norm(untilted_affine[:3, a]) for a in (1, 2))
    world = _voxel_centres(volume.shape, affine)
    depth = (world - untilted_affine[:3, 3]) @ normal
    sheared_back = world + np.tan(np.radians(degrees)) * depth[:, None] * column
    mae, covered = _body_mae(_world_resample(untilted, untilted_affine, sheared_back), volume)
    print(f"tilt vs header oracle: MAE {mae:.4f} HU over {covered:.1%} of voxels")
    assert mae < 0.05 and covered > 0.9  # the same samples: only float rounding of the interpolation
    row_step = column * np.linalg.norm(untilted_affine[:3, 1])
    one_row = _world_resample(untilted, untilted_affine, sheared_back + row_step)
    assert _body_mae(one_row, volume)[0] > 20  # a one-row (0.98 mm) misplacement would not pass


def test_tilt_correction_agrees_with_dcm2niix(shared_data, tmp_path):
    # dcm2niix (v1.0.20260724) labels its _Tilt volume with the in-plane origin of the first slice by
    # InstanceNumber while resampling onto the grid through the most inferior slice: for a series numbered
    # downwards (as the shared one is) its affine is off by the whole shear, (n - 1) * step * tan(tilt) =
    # 10.2 mm here (ours matches the header oracle above). Numbered upwards, its geometry is consistent.
    source = shared_data / "ct_chest_dicom_philips" / "dcm"
    _tilted_copy(source, tmp_path / "tilted", 10.0, slice(160, 352), ascending=True)
    volume, affine = load_volume(tmp_path / "tilted")
    command = [dcm2niix_executable(), "-z", "n", "-f", "ref", "-o", str(tmp_path), str(tmp_path / "tilted")]
    subprocess.run(command, check=True, capture_output=True)
    corrected = sorted(tmp_path.glob("ref_Tilt*.nii"))
    assert corrected, "dcm2niix wrote no tilt-corrected volume"
    image = nib.load(corrected[0])
    reference, reference_affine = np.asarray(image.dataobj, dtype=np.float32), image.affine
    # the same lattice: dcm2niix only pads the sheared rows, so each of our voxel centres is one of its own
    centres = _voxel_centres(volume.shape, affine)
    at = (centres - reference_affine[:3, 3]) @ np.linalg.inv(reference_affine[:3, :3]).T
    misplaced_mm = np.abs(at - at.round()) * np.linalg.norm(reference_affine[:3, :3], axis=0)
    assert misplaced_mm.max() < 0.1
    # and the same values there, through both affines with no offset search
    mae, covered = _body_mae(_world_resample(reference, reference_affine, centres), volume)
    print(f"tilt vs dcm2niix through the affines: MAE {mae:.3f} HU over {covered:.1%} of voxels")
    assert mae < 1.0 and covered > 0.9  # HU, linear interpolation in both


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
