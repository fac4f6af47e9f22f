"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A crash or a kill never leaves a half-written output, and an existing file is replaced only by a
complete new one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# ".<target name>.<8 random characters of mkstemp>.tmp<suffix>": what `atomic_path` leaves after a kill
# (a file), or a killed DICOM series write (a folder made by mkdtemp with suffix ".tmp")
_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(\.[^/]*)?$")


def remove_stale_temps(folder: str | Path, target: str | None = None) -> list[Path]:
    """Delete the temporary files a killed `atomic_path` left in `folder`, and the temporary folders
    of a killed series write (only those of `target` when given); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if not match or target not in (None, match["target"]) or entry.is_symlink():
            continue
        if entry.is_file():
            entry.unlink(missing_ok=True)
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it is renamed to `path`.

    `suffix` (default: the target's full suffix, e.g. ``.nii.gz``) lets writers that choose their
    format by file name see the right ending.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)  # leftovers of an earlier write of this file that was killed
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates mode 0600; give the output the permissions a plain open() would (umask applied)
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
