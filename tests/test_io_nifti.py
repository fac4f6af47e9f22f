"""NIfTI input/output: round trips checked with nibabel, 4D volumes, and one-line errors for bad files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from revgan_med.io import VolumeError, load_volume, save_volume


def test_save_then_nibabel_reads_same(tmp_path, rng, oblique_affine):
    volume = rng.normal(size=(6, 7, 5)).astype(np.float32)
    path = save_volume(volume, oblique_affine, tmp_path / "sub" / "v.nii.gz", description="derived by a GAN")
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), volume)
    np.testing.assert_allclose(img.affine, oblique_affine, atol=1e-6)
    assert img.header["descrip"].item().decode() == "derived by a GAN"
    assert [p.name for p in path.parent.iterdir()] == ["v.nii.gz"]  # no temporary file left


def test_save_replaces_existing_file(tmp_path, oblique_affine):
    path = tmp_path / "v.nii"
    save_volume(np.zeros((3, 3, 3)), oblique_affine, path)
    save_volume(np.ones((3, 3, 3)), oblique_affine, path)
    np.testing.assert_array_equal(nib.load(path).get_fdata(), 1.0)


def test_load_3d_4d_and_5d(tmp_path, rng, oblique_affine):
    data = rng.integers(-1000, 1000, size=(5, 6, 4, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, oblique_affine), tmp_path / "dti.nii.gz")
    array, affine = load_volume(tmp_path / "dti.nii.gz")
    assert array.dtype == np.float32 and array.shape == (5, 6, 4, 3)
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(affine, oblique_affine, atol=1e-6)
    # ITK writes vector images as (x, y, z, 1, c)
    nib.save(nib.Nifti1Image(data[:, :, :, None, :], oblique_affine), tmp_path / "itk.nii")
    np.testing.assert_array_equal(load_volume(tmp_path / "itk.nii")[0], data)
    scaled = nib.Nifti1Image(data[..., 0], oblique_affine)
    scaled.header.set_slope_inter(0.5, -10)  # stored values scaled on read, as for 8-bit MR
    nib.save(scaled, tmp_path / "scaled.nii")
    np.testing.assert_allclose(load_volume(tmp_path / "scaled.nii")[0], data[..., 0] * 0.5 - 10)


def test_bad_files(tmp_path, rng, oblique_affine):
    good = tmp_path / "good.nii.gz"
    save_volume(rng.normal(size=(16, 16, 16)), oblique_affine, good)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(rng.bytes(2000))
    header_only = tmp_path / "bad_header.nii.gz"
    header_only.write_bytes(gzip.compress(b"not a nifti header" * 30))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for path in (truncated, corrupt, header_only, notes, tmp_path / "missing.nii"):
        with pytest.raises(VolumeError) as info:
            load_volume(path)
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message
    with pytest.raises(VolumeError, match="no DICOM series to pick"):
        load_volume(good, series_uid="1.2.3")
    assert good.stat().st_size > truncated.stat().st_size  # inputs untouched


def test_real_dwi_and_ct(shared_data):
    dwi = shared_data / "dwi_brain_philips" / "701_DTI_Biobank_2mm_MB3S2_EPI.nii.gz"
    array, affine = load_volume(dwi)
    assert array.shape == (112, 112, 32, 17)
    np.testing.assert_allclose(affine, nib.load(dwi).affine)
    ct, _ = load_volume(shared_data / "ct_chest_1p5mm" / "chest_ct.nii.gz")
    assert ct.shape == (120, 126, 164) and ct.min() >= -1100 and ct.max() > 300
