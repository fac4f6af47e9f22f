"""DICOM series and enhanced multi-frame files → (array in HU, voxel → RAS+ affine), and back.

pydicom with the pylibjpeg (JPEG, JPEG 2000, RLE) and pyjpegls (JPEG-LS) plugins decodes every common
transfer syntax and gives us the tags we need (per-slice rescale, functional groups); SimpleITK/GDCM
would decode too but hides per-slice rescale and refuses less. Geometry is our own (MONAI's ITK reader
silently sorts and does not refuse missing slices): slices are ordered by their
position along the slice normal, never by file name or InstanceNumber, and a series whose positions
do not describe a regular grid is refused with the folder and the gap in the message (a gantry
tilt is resampled, see `tilt.py`).
`save_dicom_series` writes a volume as a new derived series (MONAI has no DICOM writer).
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from revgan_med import __version__
from revgan_med.io.atomic import remove_stale_temps
from revgan_med.io.formats import VolumeError, is_nifti, one_line
from revgan_med.io.tilt import TILT_MODES, correct_tilt

# header tags read by discovery, series selection and the writer (pixels are never read for these)
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "SeriesDescription",
    "SeriesNumber", "Rows", "Columns", "NumberOfFrames", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "PatientName", "PatientID", "PatientBirthDate",
    "PatientSex", "PatientAge", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "PatientPosition", "BodyPartExamined", "SpecificCharacterSet",
]  # fmt: skip
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ".dc3"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# patient, study and frame-of-reference modules: a derived series stays in the source's study
FROM_SOURCE = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator", "PatientPosition",
    "BodyPartExamined",
]  # fmt: skip


@dataclass(frozen=True)
class Series:
    """One DICOM series found in a folder: its files (headers only were read)."""

    uid: str
    description: str
    number: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]

    def label(self) -> str:
        return f"{self.uid} '{self.description}' ({len(self.files)} files)"


@dataclass
class _Plane:
    """One 2D image (a file or a frame) with its geometry; `pixels` indexed (row, column)."""

    position: np.ndarray  # LPS mm of the centre of the first transmitted pixel
    orientation: np.ndarray  # row direction cosines then column direction cosines
    spacing: tuple[float, float]  # (between rows, between columns) mm
    pixels: np.ndarray
    slope: float
    intercept: float
    thickness: float | None


def looks_like_dicom(path: Path) -> bool:
    """Files worth a header read: DICM magic, a DICOM suffix, no suffix (IM0001) or a UID-like name."""
    suffix = path.suffix.lower()
    return suffix in DICOM_SUFFIXES or suffix == "" or suffix[1:].isdigit() or _has_magic(path)


def read_header(path: Path) -> Dataset | None:
    """Header of an image file (stop before pixels); None for a file that is not a DICOM image.

    Raises VolumeError for a file that claims to be DICOM (magic or suffix) but cannot be parsed.
    """
    claimed = path.suffix.lower() in DICOM_SUFFIXES or _has_magic(path)
    try:
        # force: files without preamble exist; unclaimed ones must then prove to be image headers
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS, force=True)
        is_image = "Rows" in ds and "SeriesInstanceUID" in ds
    except Exception as exc:  # pydicom raises many types for damaged files
        if claimed:
            raise VolumeError(f"{path}: unreadable DICOM ({one_line(exc)})") from None
        return None
    if not is_image and claimed and "SOPClassUID" not in ds and "MediaStorageSOPClassUID" not in ds.file_meta:
        raise VolumeError(f"{path}: unreadable DICOM (no SOPClassUID / image header)")
    return ds if is_image else None


def scan_folder(folder: Path) -> tuple[dict[str, Series], list[tuple[Path, str]]]:
    """DICOM image series among the files directly in `folder`, and the DICOM-like files that failed."""
    grouped: dict[str, list[tuple[Path, Dataset]]] = {}
    failed: list[tuple[Path, str]] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if not looks_like_dicom(path):
            continue
        try:
            ds = read_header(path)
        except VolumeError as exc:
            failed.append((path, str(exc)))
            continue
        if ds is not None:
            grouped.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    series = {
        uid: Series(
            uid=uid,
            description=str(items[0][1].get("SeriesDescription", "") or ""),
            number=str(items[0][1].get("SeriesNumber", "") or ""),
            files=tuple(p for p, _ in items),
            headers=tuple(d for _, d in items),
        )
        for uid, items in grouped.items()
    }
    return series, failed


def select_series(path: Path, series_uid: str | None = None) -> Series:
    """The one series in folder (or file) `path`, or the one with `series_uid`."""
    if path.is_file():
        ds = read_header(path)
        if ds is None:
            raise VolumeError(f"{path}: not a DICOM image file")
        found = {str(ds.SeriesInstanceUID): Series(
            str(ds.SeriesInstanceUID), str(ds.get("SeriesDescription", "") or ""),
            str(ds.get("SeriesNumber", "") or ""), (path,), (ds,))}  # fmt: skip
    else:
        found, _ = scan_folder(path)
    if not found:
        raise VolumeError(f"{path}: no DICOM images found")
    if series_uid is not None:
        if series_uid not in found:
            listing = "; ".join(s.label() for s in found.values())
            raise VolumeError(f"{path}: no series {series_uid} (found: {listing})")
        return found[series_uid]
    if len(found) > 1:
        listing = "; ".join(s.label() for s in found.values())
        raise VolumeError(f"{path}: {len(found)} DICOM series, pick one by SeriesInstanceUID: {listing}")
    return next(iter(found.values()))


def load_dicom(path: str | Path, series_uid: str | None = None, *, tilt: str = "correct",
               notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Load a DICOM series folder or a single (enhanced multi-frame) file.

    Returns (float32 array (x, y, z) = (column, row, slice), 4×4 voxel → RAS+ mm affine), values with
    each slice's RescaleSlope/Intercept applied (HU for CT). Slices run along +normal (row × column).
    A gantry-tilted series is resampled onto the orthogonal grid (`tilt` "correct", see `tilt.py`) or
    refused ("refuse"); a correction is described in `notes` (appended to) when given.
    """
    if tilt not in TILT_MODES:
        raise ValueError(f"tilt {tilt!r}: expected one of {', '.join(TILT_MODES)}")
    path = Path(path)
    series = select_series(path, series_uid)
    planes: list[_Plane] = []
    for file in series.files:
        try:
            ds = pydicom.dcmread(file)
            planes.extend(_planes(ds))
        except VolumeError as exc:
            raise VolumeError(f"{file}: {exc}") from None
        except Exception as exc:  # damaged pixel data, unsupported codecs, bad tag values
            raise VolumeError(f"{file}: cannot decode DICOM image ({one_line(exc)})") from None
    return _assemble(planes, where=path, tilt=tilt, notes=notes)


def _planes(ds: Dataset) -> list[_Plane]:
    """The 2D images of one dataset: one for a classic file, one per frame for enhanced files."""
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError("colour images are not supported")
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [_plane(ds, ds, pixels)]
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise VolumeError("multi-frame image without per-frame geometry (functional groups)")
    pixels = pixels.reshape(frames, *pixels.shape[-2:])
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    out = []
    for frame, per_frame in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
        merged = Dataset()
        for group in (shared, per_frame):  # per-frame values override shared ones
            for name in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                         "PixelValueTransformationSequence"):  # fmt: skip
                if name in group:
                    merged.update(group[name][0])
        out.append(_plane(merged, ds, frame))
    return out


def _plane(geometry: Dataset, ds: Dataset, pixels: np.ndarray) -> _Plane:
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if name not in geometry or geometry[name].value in (None, ""):
            raise VolumeError(f"no {name}: not a volume slice")

    def number(name: str, default: float | None) -> float | None:
        for source in (geometry, ds):
            if source.get(name) not in (None, ""):
                return float(source.get(name))
        return default

    return _Plane(
        position=np.asarray(geometry.ImagePositionPatient, dtype=np.float64),
        orientation=np.asarray(geometry.ImageOrientationPatient, dtype=np.float64),
        spacing=(float(geometry.PixelSpacing[0]), float(geometry.PixelSpacing[1])),
        pixels=pixels,
        slope=number("RescaleSlope", 1.0),
        intercept=number("RescaleIntercept", 0.0),
        thickness=number("SpacingBetweenSlices", None) or number("SliceThickness", None),
    )


def _assemble(planes: list[_Plane], *, where: Path, tilt: str = "correct",
              notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Stack planes into (x, y, z) along the slice normal; refuse anything but a regular (or, with
    `tilt` "correct", a gantry-tilted) grid."""
    first = planes[0]
    for plane in planes[1:]:
        if plane.pixels.shape != first.pixels.shape:
            raise VolumeError(
                f"{where}: inconsistent image sizes {first.pixels.shape} vs {plane.pixels.shape}"
            )
        if not np.allclose(plane.orientation, first.orientation, atol=1e-4):
            raise VolumeError(f"{where}: inconsistent ImageOrientationPatient within the series")
        if not np.allclose(plane.spacing, first.spacing, rtol=1e-4):
            raise VolumeError(f"{where}: inconsistent PixelSpacing {first.spacing} vs {plane.spacing}")
    row, col = first.orientation[:3], first.orientation[3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(row @ col) > 1e-3:
        raise VolumeError(f"{where}: ImageOrientationPatient row and column are not orthogonal")
    normal = np.cross(row, col)
    positions = np.stack([p.position for p in planes])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    step = _slice_step(positions, normal, first.thickness, where=where)
    volume = np.stack(
        [planes[i].pixels.T.astype(np.float64) * planes[i].slope + planes[i].intercept for i in order],
        axis=-1,
    ).astype(np.float32)
    if len(positions) > 1:
        frame = (row, col, normal, first.spacing)
        volume = correct_tilt(volume, positions, frame, step, where=where, tilt=tilt, notes=notes)
    lps = np.eye(4)
    lps[:3, 0] = row * first.spacing[1]  # x runs along a row: column spacing
    lps[:3, 1] = col * first.spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    return volume, LPS_TO_RAS @ lps


def _slice_step(positions: np.ndarray, normal: np.ndarray, thickness: float | None, *, where: Path) -> float:
    """The regular slice spacing along `normal`; VolumeError for gaps and uneven spacing."""
    if len(positions) == 1:
        return thickness or 1.0
    depth = positions @ normal
    gaps = np.diff(depth)
    if gaps.min() < 1e-3:
        raise VolumeError(
            f"{where}: {len(positions)} images at {len(np.unique(depth.round(3)))} slice positions "
            "(several volumes in one series, e.g. echoes or time points, are not supported)"
        )
    step = float(np.median(gaps))
    tolerance = max(0.01, 0.01 * step)
    worst = int(np.argmax(np.abs(gaps - step)))
    if abs(gaps[worst] - step) > tolerance:
        between = f"between slices at {depth[worst]:.3f} and {depth[worst + 1]:.3f} mm along the normal"
        ratio = gaps[worst] / step
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
            raise VolumeError(
                f"{where}: missing slices: gap of {gaps[worst]:.3f} mm {between} (spacing {step:.3f} mm)"
            )
        raise VolumeError(
            f"{where}: uneven slice spacing: gap of {gaps[worst]:.3f} mm {between} "
            f"(median spacing {step:.3f} mm); resample the series before use"
        )
    return (depth[-1] - depth[0]) / (len(positions) - 1)


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


def _has_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False
