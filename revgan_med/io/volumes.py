"""Volume I/O with world geometry: NIfTI files (and DICOM series, see `dicom.py`).

Arrays are indexed (x, y, z[, channel]) as nibabel does; `affine` is the 4×4 voxel → RAS+ mm matrix.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from revgan_med.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A file or folder that cannot be read as a volume; the message names it and the problem."""


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI file as (float32 array (x, y, z[, c]), 4×4 affine)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if not is_nifti(path):
        raise VolumeError(f"{path}: not a NIfTI file (.nii / .nii.gz)")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt/truncated files
        raise VolumeError(f"{path}: cannot read NIfTI ({exc})".replace("\n", " ")) from None
    return data, np.asarray(img.affine, dtype=np.float64)


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
