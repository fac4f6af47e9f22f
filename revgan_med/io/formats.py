"""What every reader shares: the error for a volume that cannot be read, NIfTI names, one-line messages."""

from __future__ import annotations

from pathlib import Path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A file or folder that cannot be read as a volume; the message names it and the problem."""


def one_line(exc: BaseException) -> str:
    """An exception as one line (its type name when it has no message)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)
