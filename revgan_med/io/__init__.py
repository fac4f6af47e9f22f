"""Reading and writing volumes (NIfTI, DICOM) with their world geometry, and atomic file writes."""

from revgan_med.io.atomic import atomic_path, atomic_write_text
from revgan_med.io.volumes import load_volume, save_volume

__all__ = ["atomic_path", "atomic_write_text", "load_volume", "save_volume"]
