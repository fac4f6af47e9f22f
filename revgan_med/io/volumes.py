"""Volume I/O with world geometry: NIfTI files and DICOM series (see `dicom.py`), and their discovery.

Arrays are indexed (x, y, z[, channel]) as nibabel does; `affine` is the 4×4 voxel → RAS+ mm matrix.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from revgan_med.io.atomic import atomic_path
from revgan_med.io.dicom import load_dicom, looks_like_dicom, scan_folder
from revgan_med.io.formats import VolumeError, is_nifti, one_line

NIFTI_SUFFIX = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class VolumeRef:
    """One volume found by `discover_volumes`: a NIfTI file, a DICOM series (folder + UID) or a file
    that looks like DICOM but cannot be read (then `load_volume(ref.path)` raises, naming it)."""

    path: Path
    series_uid: str | None
    name: str  # filesystem-safe case name from the path relative to the root, unique within the root

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        return load_volume(self.path, series_uid=self.series_uid)


def load_volume(path: str | Path, series_uid: str | None = None, *, tilt: str = "correct",
                notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Load a volume as (float32 array (x, y, z[, c]), 4×4 voxel → RAS+ mm affine).

    `path`: a ``.nii``/``.nii.gz`` file (3D or 4D), a DICOM series folder (`series_uid` picks one
    when the folder holds several) or a single DICOM file (e.g. enhanced multi-frame). DICOM values
    have RescaleSlope/Intercept applied (HU for CT); a gantry-tilted series is resampled onto an
    orthogonal grid or, with `tilt` "refuse", refused; corrections are appended to `notes`. Every
    failure is a `VolumeError` naming `path`.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if is_nifti(path):
        if series_uid is not None:
            raise VolumeError(f"{path}: a NIfTI file has no DICOM series to pick ({series_uid})")
        return _load_nifti(path)
    if path.is_dir() or looks_like_dicom(path):
        return load_dicom(path, series_uid, tilt=tilt, notes=notes)
    raise VolumeError(f"{path}: not a volume (expected .nii / .nii.gz, a DICOM file or a DICOM folder)")


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))  # reads the header only
    except Exception as exc:  # nibabel raises many types for corrupt/truncated files
        raise VolumeError(f"{path}: cannot read NIfTI ({one_line(exc)})") from None
    _check_claimed_size(path, img)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read NIfTI ({one_line(exc)})") from None
    if data.ndim == 5 and data.shape[3] == 1:  # (x, y, z, t=1, c): vector images as ITK writes them
        data = data[:, :, :, 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim not in (3, 4):
        raise VolumeError(f"{path}: {data.ndim}D NIfTI of shape {data.shape}; expected 3D or 4D")
    return data, np.asarray(img.affine, dtype=np.float64)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_claimed_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header whose data cannot be in the file or in memory, before allocating it."""
    shape = img.shape
    claimed = int(np.prod(shape, dtype=np.float64)) * img.get_data_dtype().itemsize
    offset = int(img.header["vox_offset"])
    size = path.stat().st_size
    # deflate cannot compress better than about 1032:1, so a .nii.gz holds at most that much data
    most = size - offset if not path.name.lower().endswith(".gz") else size * 1032
    if claimed > most:
        raise VolumeError(
            f"{path}: header claims {shape} voxels ({claimed / 1e6:.1f} MB) but the file holds at most "
            f"{max(most, 0) / 1e6:.1f} MB (truncated or a wrong header)"
        )
    needed, free = int(np.prod(shape, dtype=np.float64)) * 4, available_memory()  # read as float32
    if free is not None and needed > free:
        raise VolumeError(
            f"{path}: needs {needed / 1e9:.1f} GB of memory as float32, {free / 1e9:.1f} GB available"
        )


def save_volume(array: np.ndarray, affine: np.ndarray, path: str | Path, description: str = "") -> Path:
    """Write `array` with `affine` as NIfTI atomically; `description` goes into the header `descrip`."""
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    if description:
        img.header["descrip"] = description.encode()[:79]
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def discover_volumes(root: str | Path) -> list[VolumeRef]:
    """Every NIfTI file and DICOM series under `root` (recursive), sorted by name.

    Reads DICOM headers only. A folder holding several series yields one ref per series; files that
    look like DICOM but cannot be parsed yield a ref of their own (loading it raises), so callers can
    report them; other files, hidden entries and empty folders are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise VolumeError(f"{root}: not a folder")
    found: list[tuple[Path, str | None, str]] = []  # (path, series uid, label relative to root)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        folder = Path(folder)
        rel = folder.relative_to(root).as_posix()
        visible = sorted(f for f in files if not f.startswith("."))
        for name in visible:
            if is_nifti(name):
                found.append((folder / name, None, f"{rel}/{NIFTI_SUFFIX.sub('', name)}"))
        if not any(looks_like_dicom(folder / f) for f in visible if not is_nifti(f)):
            continue
        series, failed = scan_folder(folder)
        label = rel if rel != "." else root.resolve().name
        for s in sorted(series.values(), key=lambda s: (s.number.zfill(8), s.uid)):
            suffix = f"/{s.number}_{s.description}" if len(series) > 1 else ""
            found.append((folder, s.uid, label + suffix))
        found.extend((path, None, f"{rel}/{path.name}") for path, _ in failed)
    return _unique_names(found)


def _unique_names(found: list[tuple[Path, str | None, str]]) -> list[VolumeRef]:
    """Make labels filesystem-safe; labels that collide get a short hash of their path and UID."""
    safe = [re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.-]+", "_", label.removeprefix("./"))).strip("._")
            for _, _, label in found]  # fmt: skip
    refs = []
    for (path, uid, label), name in zip(found, safe, strict=True):
        if not name or safe.count(name) > 1:
            digest = hashlib.sha1(f"{label}|{uid}".encode()).hexdigest()[:8]
            name = f"{name}_{digest}" if name else digest
        refs.append(VolumeRef(path=path, series_uid=uid, name=name))
    return sorted(refs, key=lambda r: r.name)
