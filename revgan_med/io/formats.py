"""What every reader shares: the error a volume that cannot be read raises, and NIfTI file names."""

from __future__ import annotations

from pathlib import Path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A file or folder that cannot be read as a volume; the message names it and the problem."""


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)
