"""A volume with its voxel → RAS+ affine → a new derived DICOM series (MONAI has no DICOM writer).

The series stays in its source's patient, study and frame of reference when the source is DICOM, and is
written to a temporary folder, then renamed into place.
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from revgan_med import __version__
from revgan_med.io.atomic import remove_stale_temps
from revgan_med.io.dicom import LPS_TO_RAS, looks_like_dicom, select_series
from revgan_med.io.formats import VolumeError, is_nifti

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# patient, study and frame-of-reference modules: a derived series stays in the source's study
FROM_SOURCE = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator", "PatientPosition",
    "BodyPartExamined",
]  # fmt: skip


def save_dicom_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    series_description: str,
    source: str | Path | None = None,
    source_series_uid: str | None = None,
    modality: str = "CT",
    series_number: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a 3D volume (x, y, z) with its voxel → RAS+ affine as a new derived DICOM series.

    One file per z slice (int16, RescaleSlope/Intercept chosen so the values fit; exact for integer
    values in int16 range, else within slope/2), ImageType DERIVED\\SECONDARY, new Series and SOP
    Instance UIDs. When `source` is a DICOM series (folder or file), the patient, study and frame of
    reference are kept and each slice references its nearest source image; otherwise all is new.
    The series is written to a temporary folder beside `out_dir`, then renamed into place.
    """
    out_dir = Path(out_dir)
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 3 or not np.isfinite(array).all():
        raise ValueError(f"{out_dir}: DICOM output needs a finite 3D array, got shape {array.shape}")
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    steps = np.linalg.norm(lps[:3, :3], axis=0)
    axes = lps[:3, :3] / steps
    if np.abs(axes.T @ axes - np.eye(3)).max() > 1e-4:
        raise ValueError(f"{out_dir}: a sheared affine cannot be written as DICOM slices")
    refs = _source_refs(Path(source), source_series_uid) if source is not None else None
    if source is not None and out_dir.resolve() == Path(source).resolve():
        raise ValueError(f"{out_dir}: refusing to write over the source series")
    if not overwrite:
        check_new_series_folder(out_dir)
    slope, intercept, stored = _to_int16(array)
    common = _series_dataset(
        refs[0] if refs else None, series_description=series_description, modality=modality,
        series_number=series_number, slope=slope, intercept=intercept,
    )  # fmt: skip
    common.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in axes[:, :2].T.ravel()]
    common.PixelSpacing = [format_number_as_ds(float(steps[1])), format_number_as_ds(float(steps[0]))]
    common.SliceThickness = common.SpacingBetweenSlices = format_number_as_ds(float(steps[2]))
    common.Rows, common.Columns = array.shape[1], array.shape[0]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir.parent, out_dir.name)  # left by a write of this series that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for k in range(array.shape[2]):
            ds = copy.deepcopy(common)
            position = lps[:3, 3] + k * lps[:3, 2]
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
            ds.SliceLocation = format_number_as_ds(float(position @ np.cross(axes[:, 0], axes[:, 1])))
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T, dtype="<i2").tobytes()
            if refs:
                _reference_source(ds, refs, position)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(tmp / f"slice_{k + 1:04d}.dcm", enforce_file_format=True)
        _replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_new_series_folder(out_dir: Path) -> None:
    """Refuse an existing folder as the target of a new series (callers check before computing it)."""
    if out_dir.exists():
        raise VolumeError(
            f"{out_dir}: already exists; give --output a new folder (a series is never replaced)"
        )


def _source_refs(source: Path, series_uid: str | None) -> list[Dataset] | None:
    """Headers of the source series (None when `source` is not DICOM, e.g. a NIfTI file)."""
    if is_nifti(source) or not (source.is_dir() or looks_like_dicom(source)):
        return None
    return list(select_series(source, series_uid).headers)


def _to_int16(array: np.ndarray) -> tuple[str, str, np.ndarray]:
    """(RescaleSlope, RescaleIntercept as DS strings, int16 values) with value = stored·slope + intercept."""
    lo, hi = float(array.min()), float(array.max())
    if np.array_equal(array, np.round(array)) and lo >= -32768 and hi <= 32767:
        return "1", "0", array.astype(np.int16)
    intercept = format_number_as_ds((lo + hi) / 2)
    half = max(hi - float(intercept), float(intercept) - lo)
    slope = f"{half / 32000 * 1.0001:.6g}" if half > 0 else "1"  # rounded up: |stored| < 32767
    return slope, intercept, np.round((array - float(intercept)) / float(slope)).astype(np.int16)


def _series_dataset(source: Dataset | None, *, series_description: str, modality: str,
                    series_number: int | None, slope: str, intercept: str) -> Dataset:  # fmt: skip
    """Attributes shared by every slice of the new series."""
    now = datetime.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for name in FROM_SOURCE:
        if source is not None and source.get(name) not in (None, ""):
            setattr(ds, name, source.get(name))
    ds.PatientName = ds.get("PatientName", "")
    ds.PatientID = ds.get("PatientID", "")
    for name in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, name, ds.get(name, ""))
    ds.StudyInstanceUID = ds.get("StudyInstanceUID", generate_uid())
    ds.FrameOfReferenceUID = ds.get("FrameOfReferenceUID", generate_uid())
    ds.StudyDate = ds.get("StudyDate", now.strftime("%Y%m%d"))
    ds.StudyTime = ds.get("StudyTime", now.strftime("%H%M%S"))
    ds.PositionReferenceIndicator = ds.get("PositionReferenceIndicator", "")
    ds.SOPClassUID = SOP_CLASSES.get(modality, SECONDARY_CAPTURE)
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    if series_number is None:  # beside the source's number, as scanners number derived series
        series_number = 1000 + (int(source.get("SeriesNumber") or 0) if source is not None else 0)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = series_description
    ds.Manufacturer = "revgan-med"
    ds.SoftwareVersions = __version__
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if modality == "CT":
        ds.RescaleType = "HU"
        ds.KVP = ds.AcquisitionNumber = ""
    elif modality == "MR":  # type 1/2 attributes of the MR Image module
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", "3D"
        ds.ScanOptions = ds.EchoTime = ds.EchoTrainLength = ""
    else:
        ds.ConversionType = "WSD"
    return ds


def _reference_source(ds: Dataset, refs: list[Dataset], position: np.ndarray) -> None:
    """SourceImageSequence and ReferencedSeriesSequence → the source image nearest to this slice."""
    normal = np.cross(*np.asarray(refs[0].ImageOrientationPatient, dtype=np.float64).reshape(2, 3))
    depths = [np.asarray(r.ImagePositionPatient, dtype=np.float64) @ normal
              if "ImagePositionPatient" in r else 0.0 for r in refs]  # fmt: skip
    nearest = refs[int(np.argmin(np.abs(np.asarray(depths) - position @ normal)))]
    item = Dataset()
    item.ReferencedSOPClassUID = nearest.SOPClassUID
    item.ReferencedSOPInstanceUID = nearest.SOPInstanceUID
    ds.SourceImageSequence = [item]
    series = Dataset()
    series.SeriesInstanceUID = nearest.SeriesInstanceUID
    series.StudyInstanceUID = nearest.get("StudyInstanceUID", ds.StudyInstanceUID)
    series.ReferencedInstanceSequence = [copy.deepcopy(item)]
    ds.ReferencedSeriesSequence = [series]


def _replace_folder(new: Path, target: Path) -> None:
    """Rename folder `new` to `target`; an existing `target` is moved aside first, then removed."""
    if not target.exists():
        os.replace(new, target)
        return
    if not target.is_dir():
        raise VolumeError(f"{target}: exists and is not a folder")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
