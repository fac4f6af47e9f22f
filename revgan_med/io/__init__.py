"""Reading and writing volumes (NIfTI, DICOM) with their world geometry, and atomic file writes."""

from revgan_med.io.atomic import atomic_path, atomic_write_text
from revgan_med.io.dicom_writer import save_dicom_series
from revgan_med.io.volumes import (
    VolumeError,
    VolumeRef,
    discover_volumes,
    is_nifti,
    load_volume,
    save_volume,
)

__all__ = [
    "VolumeError",
    "VolumeRef",
    "atomic_path",
    "atomic_write_text",
    "discover_volumes",
    "is_nifti",
    "load_volume",
    "save_dicom_series",
    "save_volume",
]
