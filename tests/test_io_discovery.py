"""Recursive discovery of NIfTI files and DICOM series in a messy folder tree."""

from __future__ import annotations

import re

import numpy as np
import pytest

from revgan_med.io import VolumeError, discover_volumes, load_volume, save_dicom_series, save_volume

SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture
def messy(tmp_path, rng, oblique_affine):
    """A scanner-export-like tree: NIfTI, DICOM series (two in one folder), junk, empty folders."""
    root = tmp_path / "export"
    volume = rng.integers(-1000, 1000, size=(6, 5, 4)).astype(np.float32)
    save_volume(volume, oblique_affine, root / "a" / "b_c.nii.gz")
    save_volume(volume, oblique_affine, root / "a_b" / "c.nii")  # same safe name as the one above
    save_volume(volume, oblique_affine, root / "top.nii.gz")
    first = save_dicom_series(volume, oblique_affine, root / "tmp1", series_description="soft tissue")
    second = save_dicom_series(volume, oblique_affine, root / "tmp2", series_description="lung")
    mixed = root / "patient 1" / "study"
    mixed.mkdir(parents=True)
    for series in (first, second):  # both series in one folder, as scanners export them
        for f in series.iterdir():
            f.rename(mixed / f"{series.name}_{f.name}")
        series.rmdir()
    save_dicom_series(volume, oblique_affine, root / "deep" / "er" / "ct", series_description="x")
    (root / "deep" / "er" / "ct" / "notes.txt").write_text("not an image")
    (root / "deep" / "er" / "ct" / "DICOMDIR.json").write_text("{}")
    (root / "empty" / "nested").mkdir(parents=True)
    (root / ".hidden").mkdir()
    save_volume(volume, oblique_affine, root / ".hidden" / "skip.nii.gz")
    (root / "broken").mkdir()
    (root / "broken" / "bad.dcm").write_bytes(b"\x00" * 128 + b"DICM" + rng.bytes(200))
    (root / "broken" / "README").write_text("export notes")
    return root


def test_discovers_every_volume_once(messy):
    refs = discover_volumes(messy)
    found = sorted((ref.path.relative_to(messy).as_posix(), ref.series_uid is not None) for ref in refs)
    assert found == [
        ("a/b_c.nii.gz", False),
        ("a_b/c.nii", False),
        ("broken/bad.dcm", False),
        ("deep/er/ct", True),
        ("patient 1/study", True),
        ("patient 1/study", True),
        ("top.nii.gz", False),
    ]
    names = [ref.name for ref in refs]
    assert len(set(names)) == len(names) and all(SAFE_NAME.match(n) for n in names)
    assert names == [ref.name for ref in discover_volumes(messy)]  # stable
    assert "top" in names and "deep_er_ct" in names
    study = [ref for ref in refs if ref.path.name == "study"]
    assert len({ref.series_uid for ref in study}) == 2
    assert any("lung" in ref.name for ref in study) and any("soft_tissue" in ref.name for ref in study)


def test_refs_load_and_broken_ones_fail(messy):
    for ref in discover_volumes(messy):
        if ref.path.name == "bad.dcm":
            with pytest.raises(VolumeError, match="bad.dcm"):
                ref.load()
        else:
            array, affine = ref.load()
            assert array.shape == (6, 5, 4) and affine.shape == (4, 4)
    with pytest.raises(VolumeError, match="2 DICOM series"):
        load_volume(messy / "patient 1" / "study")


def test_not_a_folder(tmp_path):
    with pytest.raises(VolumeError, match="not a folder"):
        discover_volumes(tmp_path / "missing")
    assert discover_volumes(tmp_path) == []


def test_shared_data(shared_data):
    refs = discover_volumes(shared_data)
    dicom = sorted(ref.path.relative_to(shared_data).as_posix() for ref in refs if ref.series_uid)
    assert dicom == [
        "ct_chest_dicom_philips/dcm",
        "ct_kernel_pair_philips_B_L/B",
        "ct_kernel_pair_philips_B_L/L",
        "dicom_transfer_syntaxes",
        "dwi_brain_philips_dicom/dicom",
    ]
    assert sum(ref.series_uid is None for ref in refs) == 6  # the NIfTI files
