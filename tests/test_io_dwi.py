"""DWI input: NIfTI + .bval/.bvec and DICOM series (through dcm2niix) give the same tensors and gradients."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from revgan_med.data.transforms import fit_dti, load_dti
from revgan_med.io import VolumeError
from revgan_med.io.dwi import load_dwi, read_gradients

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
# rows/columns of an oblique slab in LPS: the gradients must be rotated into the image frame
ROW, COL = np.array([0.96, 0.28, 0.0]), np.array([-0.28 * 0.8, 0.96 * 0.8, 0.6])
DIRECTIONS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0], [0, 0.6, 0.8], [0.8, 0, -0.6]], float)
BVALUES = np.array([0.0] + [1000.0] * 6)
D_LPS = np.array([[1.6, 0.3, -0.2], [0.3, 0.9, 0.1], [-0.2, 0.1, 0.5]]) * 1e-3  # mm²/s


def _signals(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """S = S0 exp(-b gᵀDg) per volume (n, z, row, col) with a smooth S0, and the gradients (n, 3)."""
    gradients = np.vstack([[0.0, 0.0, 0.0], DIRECTIONS])
    z, r, c = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    s0 = 1500.0 + 40.0 * r + 25.0 * c + 10.0 * z
    atten = np.exp(-BVALUES * np.einsum("ni,ij,nj->n", gradients, D_LPS, gradients))
    return np.round(s0[None] * atten[:, None, None, None]), gradients


def _dataset(sop_class: str, series_uid: str, manufacturer: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, generate_uid(), "MR"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Manufacturer, ds.PatientName, ds.PatientID = manufacturer, "Test^DWI", "dwi1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = "1.2.3", series_uid, 5
    ds.FrameOfReferenceUID, ds.SeriesDescription = "1.2.3.4", "DTI synthetic"
    ds.StudyDate, ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime = "20260101", "120000", "120000", "120000"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PatientPosition, ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength = "HFS", 80, 5000, 3
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    return ds


def _geometry(ds: Dataset, k: int) -> None:
    ds.ImageOrientationPatient = [float(v) for v in (*ROW, *COL)]
    ds.ImagePositionPatient = [float(v) for v in np.array([-20.0, 10.0, 30.0]) + k * 2.5 * np.cross(ROW, COL)]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = ds.SpacingBetweenSlices = 2.5


def write_classic_dwi(folder, manufacturer: str = "Canon_Medical_Systems") -> None:
    """One classic MR file per slice and volume, b-value and direction in (0018,9087)/(0018,9089)."""
    signals, gradients = _signals((6, 10, 12))
    uid = generate_uid()
    folder.mkdir(parents=True)
    for v, (volume, g) in enumerate(zip(signals, gradients, strict=True)):
        for k, plane in enumerate(volume):
            ds = _dataset(MR_IMAGE, uid, manufacturer)
            ds.InstanceNumber, ds.AcquisitionNumber = v * len(volume) + k + 1, v + 1
            _geometry(ds, k)
            ds.DiffusionBValue = float(BVALUES[v])
            ds.DiffusionGradientOrientation = [float(x) for x in g]
            ds.Rows, ds.Columns = plane.shape
            ds.PixelData = plane.astype("<u2").tobytes()
            ds.save_as(folder / f"im{v:02d}_{k:02d}.dcm", enforce_file_format=True)


def write_enhanced_dwi(path) -> None:
    """One enhanced MR file, one frame per slice and volume, gradients in each MRDiffusionSequence."""
    signals, gradients = _signals((6, 10, 12))
    ds = _dataset(ENHANCED_MR_IMAGE, generate_uid(), "Canon_Medical_Systems")
    ds.InstanceNumber, ds.NumberOfFrames = 1, signals.shape[0] * signals.shape[1]
    ds.Rows, ds.Columns = signals.shape[2:]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20260101", "120000", "20260101120000"
    shared, measures, orientation = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness, measures.SpacingBetweenSlices = [2.0, 2.0], 2.5, 2.5
    orientation.ImageOrientationPatient = [float(v) for v in (*ROW, *COL)]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.DimensionIndexSequence = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111), (0x00209128, 0x00209111)):
        index = Dataset()
        index.DimensionIndexPointer, index.FunctionalGroupPointer = pointer, group
        ds.DimensionIndexSequence.append(index)
    frames = []
    for v, g in enumerate(gradients):
        for k in range(signals.shape[1]):
            frame, position, diffusion, content = Dataset(), Dataset(), Dataset(), Dataset()
            holder = Dataset()
            _geometry(holder, k)
            position.ImagePositionPatient = holder.ImagePositionPatient
            diffusion.DiffusionBValue = float(BVALUES[v])
            diffusion.DiffusionDirectionality = "DIRECTIONAL" if BVALUES[v] > 0 else "NONE"
            if BVALUES[v] > 0:
                direction = Dataset()
                direction.DiffusionGradientOrientation = [float(x) for x in g]
                diffusion.DiffusionGradientDirectionSequence = [direction]
            content.DimensionIndexValues = [1, k + 1, v + 1]
            content.StackID, content.InStackPositionNumber, content.TemporalPositionIndex = "1", k + 1, v + 1
            frame.PlanePositionSequence, frame.MRDiffusionSequence = [position], [diffusion]
            frame.FrameContentSequence = [content]
            frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = signals.reshape(-1, *signals.shape[2:]).astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _expected_fsl(affine: np.ndarray, vectors_lps: np.ndarray) -> np.ndarray:
    """FSL .bvec convention: LPS → RAS → voxel axes of `affine`, x negated when det(affine) > 0."""
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    out = (np.diag([-1.0, -1.0, 1.0]) @ vectors_lps.T).T @ axes
    if np.linalg.det(affine[:3, :3]) > 0:
        out[:, 0] *= -1
    return out


def _lower_triangular(d: np.ndarray) -> np.ndarray:
    return np.array([d[0, 0], d[0, 1], d[1, 1], d[0, 2], d[1, 2], d[2, 2]])


@pytest.mark.parametrize("layout", ["classic", "enhanced"])
def test_synthetic_dicom_dwi_recovers_gradients_and_tensor(tmp_path, layout):
    if layout == "classic":
        write_classic_dwi(tmp_path / "dwi")
        source = tmp_path / "dwi"
    else:
        source = tmp_path / "dwi" / "enhanced.dcm"
        write_enhanced_dwi(source)
    dwi = load_dwi(source)
    assert dwi.data.shape == (12, 10, 6, 7)
    np.testing.assert_allclose(np.sort(dwi.bvals), BVALUES)
    # each written direction once (dcm2niix may reorder volumes; ±g is the same direction)
    cosines = np.abs(_expected_fsl(dwi.affine, DIRECTIONS) @ dwi.bvecs[dwi.bvals > 0].T)
    assert sorted(np.argmax(cosines, axis=1)) == list(range(6))
    np.testing.assert_allclose(cosines.max(axis=1), 1.0, atol=1e-4)
    # the tensor in the image frame is the one we wrote in the patient frame, rotated the same way
    rotation = _expected_fsl(dwi.affine, np.eye(3)).T  # column i: LPS axis i in the FSL voxel frame
    tensor = fit_dti(dwi.data, dwi.bvals, dwi.bvecs)[3:9, 3:7, 2:4].reshape(-1, 6)
    expected_tensor = _lower_triangular(rotation @ D_LPS @ rotation.T)
    np.testing.assert_allclose(tensor, np.broadcast_to(expected_tensor, tensor.shape), atol=5e-6)


def test_dicom_without_gradients_is_refused_in_one_line(tmp_path):
    write_classic_dwi(tmp_path / "dwi")
    for file in (tmp_path / "dwi").iterdir():
        from pydicom import dcmread

        ds = dcmread(file)
        del ds.DiffusionBValue, ds.DiffusionGradientOrientation
        ds.save_as(file)
    with pytest.raises(VolumeError, match="no diffusion gradients") as info:
        load_dwi(tmp_path / "dwi")
    assert str(info.value).startswith(str(tmp_path / "dwi")) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("bvec", "message"),
    [("1 0\n0 1\n", "3 rows"), ("1 0 x\n0 1 0\n0 0 1\n", "not a table"),
     ("1 0 0 1\n0 1 0 0\n0 0 1 0\n", "4 gradient directions but 3"), ("2 0 0\n0 1 0\n0 0 1\n", "length 2")],
)  # fmt: skip
def test_malformed_bvec_names_the_file(tmp_path, bvec, message):
    (tmp_path / "d.bval").write_text("1000 1000 1000\n")
    (tmp_path / "d.bvec").write_text(bvec)
    with pytest.raises(VolumeError, match=message) as info:
        read_gradients(tmp_path / "d.bval", tmp_path / "d.bvec")
    assert str(tmp_path / "d.b") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_philips_dicom_gives_the_nifti_tensors_and_gradients(shared_data):
    """The classic Philips DICOM of the shared DWI: same grid, gradients as dcm2niix's reference, same DTI."""
    folder = shared_data / "dwi_brain_philips_dicom"
    dwi = load_dwi(folder / "dicom")
    reference = sorted((folder / "dcm2niix_reference").glob("*.bval"))[0]
    bvals, bvecs = read_gradients(reference, reference.with_suffix(".bvec"))
    np.testing.assert_allclose(dwi.bvals, bvals)
    np.testing.assert_allclose(dwi.bvecs, bvecs, atol=1e-5)
    dti, mask, affine, _ = load_dti(folder / "dicom")
    nifti = shared_data / "dwi_brain_philips" / "701_DTI_Biobank_2mm_MB3S2_EPI.nii.gz"
    ref_dti, ref_mask, ref_affine, _ = load_dti(nifti)
    assert dti.shape == ref_dti.shape == (112, 112, 32, 6)
    np.testing.assert_allclose(affine, ref_affine, atol=1e-4)
    assert (mask == ref_mask).all() and mask.sum() > 10_000
    error = np.sqrt(np.mean((dti[mask] - ref_dti[mask]) ** 2)) / np.sqrt(np.mean(ref_dti[mask] ** 2))
    assert error < 0.02


def test_preprocess_and_infer_take_a_dicom_dwi_series(tmp_path):
    """dmri-sr preprocess and infer read a DWI DICOM folder as they read a DWI NIfTI: same tensors."""
    import nibabel as nib
    import torch

    from revgan_med.checkpoints import Model
    from revgan_med.cli import main
    from revgan_med.inference_files import infer_path

    write_classic_dwi(tmp_path / "scans" / "dwi")
    dti, _, affine, _ = load_dti(tmp_path / "scans" / "dwi")
    assert main(["preprocess", str(tmp_path / "scans"), str(tmp_path / "prep"), "--task", "dmri-sr",
                 "--factors", "1,1,1"]) == 0  # fmt: skip
    target = nib.load(tmp_path / "prep" / "dwi" / "target.nii.gz")
    np.testing.assert_allclose(target.get_fdata(), dti, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(target.affine, affine, atol=1e-4)

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        inverse = forward

    model = Model(Identity(), "dmri-sr", {"kind": "dti-scale", "percentile": 99.5, "scales": None}, (8, 8, 8))
    infer_path(model, tmp_path / "scans" / "dwi", tmp_path / "out.nii.gz")
    np.testing.assert_allclose(nib.load(tmp_path / "out.nii.gz").get_fdata(), dti, rtol=1e-5, atol=1e-9)
