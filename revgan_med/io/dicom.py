"""DICOM series and enhanced multi-frame files → (array in HU, voxel → RAS+ affine).

pydicom with the pylibjpeg (JPEG, JPEG 2000, RLE) and pyjpegls (JPEG-LS) plugins decodes every common
transfer syntax and gives us the tags we need (per-slice rescale, functional groups); SimpleITK/GDCM
would decode too but hides per-slice rescale and refuses less. Geometry is our own (MONAI's ITK reader
silently sorts and does not refuse missing slices): slices are ordered by their
position along the slice normal, never by file name or InstanceNumber, and a series whose positions
do not describe a regular grid is refused with the folder and the gap in the message (a gantry
tilt is resampled, see `tilt.py`).
Writing a volume back as a DICOM series is `dicom_writer.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from revgan_med.io.formats import VolumeError, one_line
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


def _has_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False
