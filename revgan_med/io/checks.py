"""Guards that keep bad inputs from turning into silent outputs or writes in the wrong place.

Each raises a `ValueError` whose one-line message names the file and the problem; callers report it
(a failed row in a batch, or an exit code in the CLI).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

HASH_LIMIT = 64 * 2**20  # files up to this size are identified by content, larger ones by size + mtime
_UNSAFE_NAME = re.compile(r"[/\\\x00]")


def require_finite(array: np.ndarray, where: str | Path) -> None:
    """Refuse an array holding NaN or ±Inf: every later stage would spread it silently."""
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        kind = "all voxels are" if bad == array.size else f"{bad} of {array.size} voxels are"
        raise ValueError(f"{where}: {kind} NaN or infinite; refusing to use a non-finite volume")


def safe_component(name: str, where: str) -> str:
    """`name` if it is one harmless path component (no separator, not ``.``/``..``, not hidden)."""
    if not name or name.startswith(".") or _UNSAFE_NAME.search(name) or Path(name).is_absolute():
        raise ValueError(
            f"{where}: case name {name!r} must be one folder name (no '/', '\\', '..' or leading '.')"
        )
    return name


def require_inside(path: Path, root: Path, inputs: Iterable[Path] = ()) -> Path:
    """`path` resolved; refuse it unless it lies inside `root` and is none of `inputs` (nor inside one)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"{path}: refusing to write outside the output folder {root}")
    for source in inputs:
        src = Path(source).resolve()
        if resolved == src or resolved.is_relative_to(src):
            raise ValueError(f"{path}: refusing to write over the input {source}")
    return resolved


def check_output_location(path: str | Path) -> None:
    """Refuse an output whose nearest existing ancestor is not a writable folder (before any work)."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: cannot be created ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be created ({parent} is not writable)")


def input_identity(path: Path, series_uid: str | None = None) -> dict:
    """What makes an input the same input on a later run, as plain data.

    A file: size and SHA-256 (over `HASH_LIMIT`: size and modification time). A folder (DICOM
    series): the SeriesInstanceUID and the sorted names, sizes and modification times of its files.
    """
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        if stat.st_size > HASH_LIMIT:
            return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return {"size": stat.st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    listing = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {"series_uid": series_uid, "files": listing}
