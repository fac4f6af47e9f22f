"""DICOM input/output: geometry against hand-built affines, SimpleITK and dcm2niix; HU; bad series."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from scipy.spatial.transform import Rotation

from revgan_med.io import VolumeError, load_volume, save_dicom_series

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
STUDY_UID = generate_uid()


def _base(series_uid: str, description: str = "", *, sop_class: str = CT_IMAGE) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, generate_uid(), "CT"
    ds.PatientName, ds.PatientID, ds.StudyInstanceUID = "Test^Phantom", "p1", STUDY_UID
    ds.SeriesInstanceUID, ds.SeriesDescription, ds.SeriesNumber = series_uid, description, 3
    ds.FrameOfReferenceUID = "1.2.3.4"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 1
    return ds


def write_slice(
    path: Path, pixels: np.ndarray, position, *, series_uid: str, instance: int = 1, orientation=AXIAL,
    spacing=(0.5, 0.7), slope=1.0, intercept=0.0, description="",
) -> Path:  # fmt: skip
    """One classic CT slice written with plain pydicom; `pixels` indexed (row, column)."""
    ds = _base(series_uid, description)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 2.5
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, stack: np.ndarray, positions, *, rng, series_uid=None, **kw) -> list[Path]:
    """Slices `stack[k]` at `positions[k]`, in files named and numbered in a shuffled order."""
    series_uid = series_uid or generate_uid()
    names = rng.permutation(len(stack))
    files = []
    for k, name in enumerate(names):
        path = folder / f"im{name:03d}.dcm"
        files.append(
            write_slice(path, stack[k], positions[k], series_uid=series_uid, instance=name + 1, **kw)
        )
    return files


def sitk_volume(files) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: SimpleITK/GDCM, (x, y, z) array and voxel → RAS affine."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(Path(files[0]).parent)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32), LPS_TO_RAS @ lps


def in_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient to the closest RAS+ voxel order (world geometry kept) so two readers can be compared."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture
def stack(rng) -> np.ndarray:
    return rng.integers(-1000, 2000, size=(7, 6, 5)).astype(np.int16)  # (slice, row, column)


def test_axial_shuffled_files_hand_affine(tmp_path, rng, stack):
    positions = [(10.0, -20.0, -30.0 + 2.5 * k) for k in range(7)]
    files = write_series(tmp_path / "s", stack, positions, rng=rng, intercept=-1024.0)
    array, affine = load_volume(tmp_path / "s")
    expected = np.array([[-0.7, 0, 0, -10], [0, -0.5, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    np.testing.assert_allclose(affine, expected, atol=1e-9)
    np.testing.assert_array_equal(array, stack.transpose(2, 1, 0).astype(np.float32) - 1024)
    ref, ref_affine = sitk_volume(files)
    np.testing.assert_array_equal(array, ref)
    np.testing.assert_allclose(affine, ref_affine, atol=1e-6)


def test_reversed_slice_direction_same_world(tmp_path, rng, stack):
    positions = [(10.0, -20.0, 30.0 - 2.5 * k) for k in range(7)]  # first file is the highest slice
    write_series(tmp_path / "s", stack, positions, rng=rng)
    array, affine = load_volume(tmp_path / "s")
    assert affine[2, 2] == pytest.approx(2.5) and affine[2, 3] == pytest.approx(30.0 - 2.5 * 6)
    np.testing.assert_array_equal(array, stack[::-1].transpose(2, 1, 0))


def test_oblique_series_matches_simpleitk(tmp_path, rng, stack):
    rot = Rotation.from_euler("xyz", [20, -15, 35], degrees=True).as_matrix()
    start = np.array([-40.0, 12.0, 7.5])
    positions = [start + 1.7 * k * rot[:, 2] for k in range(7)]
    files = write_series(tmp_path / "s", stack, positions, rng=rng, orientation=rot[:, :2].T.ravel())
    array, affine = load_volume(tmp_path / "s")
    lps = np.eye(4)
    lps[:3, :3] = rot @ np.diag([0.7, 0.5, 1.7])
    lps[:3, 3] = start
    np.testing.assert_allclose(affine, LPS_TO_RAS @ lps, atol=1e-6)
    ref, ref_affine = sitk_volume(files)
    np.testing.assert_allclose(affine, ref_affine, atol=1e-4)
    np.testing.assert_array_equal(array, ref)


def test_per_slice_rescale(tmp_path, rng, stack):
    folder = tmp_path / "s"
    uid = generate_uid()
    slopes, intercepts = [1.0, 0.5, 2.0, 1.0, 0.25, 1.0, 3.0], [-1024, 0, -500, -1000, 10, -1024, -3000]
    for k in range(7):
        write_slice(folder / f"{6 - k}.dcm", stack[k], (0, 0, 2.5 * k), series_uid=uid,
                    slope=slopes[k], intercept=intercepts[k])  # fmt: skip
    array, _ = load_volume(folder)
    for k in range(7):
        np.testing.assert_allclose(array[:, :, k], stack[k].T * slopes[k] + intercepts[k])


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([0, 2.5, 5, 10, 12.5], "missing slices"),
        ([0, 2.5, 5, 8, 10.5], "uneven slice spacing"),
        ([0, 2.5, 2.5, 5, 7.5], "several volumes"),
    ],
)
def test_irregular_slice_positions_refused(tmp_path, rng, stack, steps, message):
    write_series(tmp_path / "s", stack[:5], [(0.0, 0.0, z) for z in steps], rng=rng)
    with pytest.raises(VolumeError, match=message) as info:
        load_volume(tmp_path / "s")
    assert str(info.value).startswith(str(tmp_path / "s")) and "\n" not in str(info.value)


def test_inconsistent_slices_refused(tmp_path, rng, stack):
    uid = generate_uid()
    write_slice(tmp_path / "a" / "1.dcm", stack[0], (0, 0, 0), series_uid=uid)
    write_slice(tmp_path / "a" / "2.dcm", stack[1, :5], (0, 0, 2.5), series_uid=uid)
    with pytest.raises(VolumeError, match="inconsistent image sizes"):
        load_volume(tmp_path / "a")
    write_slice(tmp_path / "b" / "1.dcm", stack[0], (0, 0, 0), series_uid=uid)
    write_slice(
        tmp_path / "b" / "2.dcm", stack[1], (0, 0, 2.5), series_uid=uid, orientation=(0, 1, 0, 1, 0, 0)
    )
    with pytest.raises(VolumeError, match="inconsistent ImageOrientationPatient"):
        load_volume(tmp_path / "b")


def test_two_series_in_one_folder(tmp_path, rng, stack):
    uid_a, uid_b = generate_uid(), generate_uid()
    for k in range(3):
        write_slice(tmp_path / f"a{k}.dcm", stack[k], (0, 0, 2.5 * k), series_uid=uid_a, description="soft")
        write_slice(
            tmp_path / f"b{k}.dcm", stack[k + 3], (0, 0, 2.5 * k), series_uid=uid_b, description="lung"
        )
    with pytest.raises(VolumeError) as info:
        load_volume(tmp_path)
    assert all(s in str(info.value) for s in (uid_a, uid_b, "soft", "lung"))
    array, _ = load_volume(tmp_path, series_uid=uid_b)
    np.testing.assert_array_equal(array, stack[3:6].transpose(2, 1, 0))
    with pytest.raises(VolumeError, match="no series 9.9"):
        load_volume(tmp_path, series_uid="9.9")


def test_enhanced_multiframe(tmp_path, rng, stack):
    order = rng.permutation(7)  # frames stored out of spatial order, each with its own rescale
    ds = _base(generate_uid(), sop_class=ENHANCED_CT_IMAGE)
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = 7, stack.shape[1:]
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.7]
    shared.PixelMeasuresSequence[0].SliceThickness = 2.0
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = [5.0 + 2.0 * k, -3.0, 40.0]
        item.PixelValueTransformationSequence = [Dataset()]
        item.PixelValueTransformationSequence[0].RescaleSlope = 1.0 + k
        item.PixelValueTransformationSequence[0].RescaleIntercept = -1024.0
        item.PixelValueTransformationSequence[0].RescaleType = "HU"
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.ascontiguousarray(stack[order], dtype="<i2").tobytes()
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    array, affine = load_volume(tmp_path / "enhanced.dcm")
    # row → +y (posterior), column → -z (feet), normal = row × column = -x (right); RAS flips x and y
    expected = np.array([[0, 0, 2.0, -5.0 - 12.0], [-0.7, 0, 0, 3.0], [0, -0.5, 0, 40.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(affine, expected, atol=1e-9)
    for k in range(7):  # slice index runs along -x, i.e. from the highest x position down
        np.testing.assert_array_equal(array[:, :, 6 - k], stack[k].T * (1.0 + k) - 1024)


def test_jpeg_baseline_lossy(tmp_path):
    from PIL import Image

    smooth = np.add.outer(np.arange(64) * 3, np.arange(48) * 2).astype(np.uint8)  # (rows, columns)
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    ds = _base(generate_uid())
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.Rows, ds.Columns = smooth.shape
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], list(AXIAL), [1, 1]
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    array, _ = load_volume(tmp_path / "jpeg.dcm")
    assert array.shape == (48, 64, 1)
    assert np.abs(array[:, :, 0] - smooth.T).mean() < 1.0


def test_truncated_and_garbage_dicom(tmp_path, rng, stack):
    files = write_series(tmp_path / "s", stack[:3], [(0, 0, 2.5 * k) for k in range(3)], rng=rng)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 20])
    with pytest.raises(VolumeError) as info:
        load_volume(tmp_path / "s")
    assert str(info.value).startswith(str(files[1]))
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + rng.bytes(300))
    with pytest.raises(VolumeError, match="junk.dcm"):
        load_volume(tmp_path / "junk.dcm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no DICOM images"):
        load_volume(tmp_path / "empty")


# --- real scans ---------------------------------------------------------------------------------


def test_transfer_syntaxes_identical_pixels(shared_data):
    files = sorted((shared_data / "dicom_transfer_syntaxes").glob("*.dcm"))
    assert len(files) == 9
    reference, ref_affine = load_volume(files[0])
    uids = set()
    for file in files:
        uids.add(pydicom.dcmread(file, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        array, affine = load_volume(file)
        np.testing.assert_array_equal(array, reference)  # all nine are lossless
        np.testing.assert_allclose(affine, ref_affine)
        decoded = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))[0].T  # GDCM as independent decoder
        np.testing.assert_array_equal(array[:, :, 0], decoded)
    assert len(uids) == 7  # explicit, implicit, big endian, RLE, JPEG lossless, JPEG-LS, JPEG 2000


def test_philips_ct_in_hu(shared_data):
    folder = shared_data / "ct_chest_dicom_philips" / "dcm"
    array, affine = load_volume(folder)
    assert array.shape == (512, 512, 30)
    np.testing.assert_allclose(np.diag(affine)[:3], [-0.9765625, -0.9765625, 2.0])
    raw = pydicom.dcmread(folder / "00-slice056.dcm")  # highest slice (z = 3.5) → last index
    assert float(raw.RescaleIntercept) == -1024
    np.testing.assert_array_equal(array[:, :, -1], raw.pixel_array.T.astype(np.float32) - 1024)
    assert array.min() == -1024  # stored 0 outside the field of view
    counts, edges = np.histogram(array[array > -1020], bins=np.arange(-1020, 200, 10))
    assert -1030 <= edges[np.argmax(counts)] <= -970  # the commonest value is air (outside body, lungs)
    assert -100 <= np.median(array[230:280, 230:280]) <= 100  # soft tissue in the mediastinum
    assert np.percentile(array, 99.5) > 200  # bone / contrast present


def test_kernel_pair_share_geometry(shared_data):
    smooth, smooth_affine = load_volume(shared_data / "ct_kernel_pair_philips_B_L" / "B")
    sharp, sharp_affine = load_volume(shared_data / "ct_kernel_pair_philips_B_L" / "L")
    assert smooth.shape == sharp.shape == (512, 512, 20)
    np.testing.assert_allclose(smooth_affine, sharp_affine)
    # same anatomy (strongly correlated), different kernels (sharp has more high-frequency energy)
    assert np.corrcoef(smooth.ravel(), sharp.ravel())[0, 1] > 0.9
    assert np.abs(np.diff(sharp, axis=0)).mean() > np.abs(np.diff(smooth, axis=0)).mean()


@pytest.mark.parametrize("series", ["ct_chest_dicom_philips/dcm", "ct_kernel_pair_philips_B_L/L"])
def test_world_geometry_matches_dcm2niix(shared_data, tmp_path, series):
    # the console script sits beside the interpreter when the venv is not activated
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("dcm2niix", path=search)
    assert binary, "dcm2niix (PyPI package in the test extra) must be installed"
    subprocess.run([binary, "-z", "n", "-f", "ref", "-o", str(tmp_path), str(shared_data / series)],
                   check=True, capture_output=True)  # fmt: skip
    img = nib.load(tmp_path / "ref.nii")
    ref, ref_affine = in_ras(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    array, affine = in_ras(*load_volume(shared_data / series))
    np.testing.assert_allclose(affine, ref_affine, atol=1e-3)
    assert np.abs(array - ref).mean() < 1.0


# --- DICOM output ---------------------------------------------------------------------------------


def test_save_series_keeps_study_and_round_trips(shared_data, tmp_path):
    source = shared_data / "ct_kernel_pair_philips_B_L" / "B"
    array, affine = load_volume(source)
    out = save_dicom_series(array[100:140, 200:232], affine @ _shift(100, 200), tmp_path / "derived",
                            series_description="revgan-med output (derived)", source=source)  # fmt: skip
    files = sorted(out.iterdir())
    assert len(files) == 20 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in source.iterdir()]
    src = headers[0]
    src_z = {h.SOPInstanceUID: float(h.ImagePositionPatient[2]) for h in headers}
    written = [pydicom.dcmread(f) for f in files]
    series_uids = {d.SeriesInstanceUID for d in written}
    assert {d.StudyInstanceUID for d in written} == {src.StudyInstanceUID}
    assert {d.PatientID for d in written} == {src.PatientID}
    assert len(series_uids) == 1 and src.SeriesInstanceUID not in series_uids
    sop_uids = {d.SOPInstanceUID for d in written}
    assert len(sop_uids) == 20 and not sop_uids & src_z.keys()
    assert all(list(d.ImageType) == ["DERIVED", "SECONDARY"] for d in written)
    assert all(d.SeriesDescription == "revgan-med output (derived)" for d in written)
    for d in written:  # each slice references the source image at its own position
        assert d.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
        referenced = d.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert src_z[referenced] == pytest.approx(float(d.ImagePositionPatient[2]))
    ref, ref_affine = sitk_volume(files)
    np.testing.assert_allclose(ref_affine, affine @ _shift(100, 200), atol=1e-4)
    np.testing.assert_array_equal(ref, array[100:140, 200:232])  # integer HU: exact
    again, again_affine = load_volume(out)
    np.testing.assert_array_equal(again, array[100:140, 200:232])
    np.testing.assert_allclose(again_affine, affine @ _shift(100, 200), atol=1e-6)


def _shift(i: int, j: int) -> np.ndarray:
    shift = np.eye(4)
    shift[:2, 3] = i, j
    return shift


def test_save_series_oblique_float_values(tmp_path, rng, oblique_affine):
    volume = rng.normal(0, 600, size=(12, 10, 6)).astype(np.float32)
    out = save_dicom_series(volume, oblique_affine, tmp_path / "out", series_description="test")
    slope = float(pydicom.dcmread(next(out.iterdir()), stop_before_pixels=True).RescaleSlope)
    ref, ref_affine = sitk_volume(sorted(out.iterdir()))
    np.testing.assert_allclose(ref_affine, oblique_affine, atol=1e-4)
    assert np.abs(ref - volume).max() <= slope / 2 + 1e-3
    array, affine = load_volume(out)
    np.testing.assert_allclose(affine, oblique_affine, atol=1e-6)
    assert np.abs(array - volume).max() <= slope / 2 + 1e-3


def test_save_series_left_handed_affine_same_world(tmp_path, rng):
    affine = np.diag([-0.8, 0.9, 2.0, 1.0])  # as dcm2niix often writes: x flipped
    affine[:3, 3] = [50, -60, 10]
    volume = rng.integers(-1000, 1000, size=(8, 9, 5)).astype(np.float32)
    out = save_dicom_series(volume, affine, tmp_path / "out", series_description="test")
    got, want = in_ras(*load_volume(out)), in_ras(volume, affine)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)
    np.testing.assert_array_equal(got[0], want[0])


def test_save_series_refuses_overwrite_and_bad_input(tmp_path, rng):
    volume = rng.normal(size=(4, 4, 3))
    out = save_dicom_series(volume, np.eye(4), tmp_path / "out", series_description="a")
    with pytest.raises(VolumeError, match="already exists"):
        save_dicom_series(volume, np.eye(4), out, series_description="b")
    save_dicom_series(volume + 5, np.eye(4), out, series_description="b", overwrite=True)
    assert len(list(out.iterdir())) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert pydicom.dcmread(next(out.iterdir())).SeriesDescription == "b"
    with pytest.raises(ValueError, match="over the source"):
        save_dicom_series(volume, np.eye(4), out, series_description="c", source=out, overwrite=True)
    with pytest.raises(ValueError, match="3D"):
        save_dicom_series(volume[..., None], np.eye(4), tmp_path / "x", series_description="c")
    sheared = np.eye(4)
    sheared[0, 2] = 0.5
    with pytest.raises(ValueError, match="sheared"):
        save_dicom_series(volume, sheared, tmp_path / "x", series_description="c")


def test_a_new_series_write_removes_only_the_temporary_folder_a_killed_write_of_it_left(tmp_path, rng):
    killed = tmp_path / ".out.k1ll3d_x.tmp"  # mkdtemp's folder for a write of "out", killed mid-series
    other = tmp_path / ".other.k1ll3d_x.tmp"  # another series' temporary: not ours to touch
    aside = tmp_path / ".out.k1ll3d_x.old"  # a replaced series moved aside: may hold the only copy
    for folder in (killed, other, aside):
        folder.mkdir()
        (folder / "slice_0001.dcm").write_bytes(b"half")
    save_dicom_series(rng.normal(size=(4, 4, 3)), np.eye(4), tmp_path / "out", series_description="a")
    assert not killed.exists() and other.exists() and aside.exists()
    assert len(list((tmp_path / "out").iterdir())) == 3
