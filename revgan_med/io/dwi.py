"""Diffusion-weighted series with their gradients: a DWI NIfTI with .bval/.bvec beside it, or a DICOM series.

DICOM DWI goes through dcm2niix (the field's reference converter; its handling of vendor gradient tags,
Philips volume order and Siemens CSA headers is what FSL/dipy users trust), run into a temporary folder.
Its b-vectors are in the FSL convention: image (voxel) axes, with x flipped when the affine has a
positive determinant, which is what dipy expects together with the NIfTI affine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from revgan_med.io.dicom import select_series
from revgan_med.io.formats import VolumeError, is_nifti
from revgan_med.io.volumes import load_volume

DCM2NIIX_TIMEOUT_S = 600


@dataclass
class DWI:
    """A 4D DWI series: `data` (x, y, z, n), `affine` voxel → RAS+ mm, `bvals` (n,), `bvecs` (n, 3)."""

    data: np.ndarray
    affine: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray


def gradient_files(nifti: Path) -> tuple[Path, Path]:
    """The FSL .bval/.bvec paths beside a NIfTI file (same stem)."""
    name = nifti.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
    return nifti.with_name(stem + ".bval"), nifti.with_name(stem + ".bvec")


def read_gradients(bval: Path, bvec: Path, volumes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FSL gradient files → (bvals (n,), unit-or-zero bvecs (n, 3)); VolumeError naming the bad file.

    A .bval is one row of n numbers; a .bvec is three rows of n numbers (or n rows of three).
    `volumes`, when given, is the n the DWI has.
    """
    bvals = _numbers(bval).ravel()
    vecs = _numbers(bvec)
    if vecs.ndim != 2 or 3 not in vecs.shape:
        raise VolumeError(f"{bvec}: expected 3 rows of gradient components, got shape {vecs.shape}")
    vecs = vecs if vecs.shape[1] == 3 and vecs.shape[0] != 3 else vecs.T
    if len(vecs) != len(bvals):
        raise VolumeError(f"{bvec}: {len(vecs)} gradient directions but {len(bvals)} b-values in {bval.name}")
    if volumes is not None and len(bvals) != volumes:
        raise VolumeError(f"{bval}: {len(bvals)} b-values for a DWI series of {volumes} volumes")
    if (bvals < 0).any():
        raise VolumeError(f"{bval}: negative b-value {bvals.min():g}")
    norms = np.linalg.norm(vecs, axis=1)
    bad = (bvals > 50) & (np.abs(norms - 1) > 0.1)
    if bad.any():
        first = int(np.argmax(bad))
        raise VolumeError(f"{bvec}: direction {first + 1} has length {norms[first]:.3g}, not 1")
    return bvals, vecs


def _numbers(path: Path) -> np.ndarray:
    try:
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        array = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except (OSError, UnicodeDecodeError) as exc:
        raise VolumeError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    except ValueError:
        raise VolumeError(f"{path}: not a table of numbers (rows of equal length)") from None
    if array.size == 0 or not np.isfinite(array).all():
        raise VolumeError(f"{path}: empty or non-finite values")
    return array


def load_dwi(path: str | Path, series_uid: str | None = None) -> DWI:
    """A DWI NIfTI (with .bval/.bvec beside it) or a DICOM DWI series (folder or file) → `DWI`.

    Every failure is a `VolumeError` naming the file or folder.
    """
    path = Path(path)
    if is_nifti(path):
        bval, bvec = gradient_files(path)
        if not (bval.is_file() and bvec.is_file()):
            raise VolumeError(f"{path}: a DWI series needs {bval.name} and {bvec.name} beside it")
        data, affine = load_volume(path)
        if data.ndim != 4:
            raise VolumeError(f"{path}: expected a 4D DWI series, got shape {data.shape}")
        return DWI(data, affine, *read_gradients(bval, bvec, data.shape[3]))
    return _convert_dicom(path, series_uid)


def dcm2niix_executable() -> str:
    """The dcm2niix installed beside this interpreter (the `dcm2niix` package), else the one on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("dcm2niix", path=search)
    if found is None:
        raise VolumeError("dcm2niix not found: DICOM DWI needs it (pip install dcm2niix)")
    return found


def _convert_dicom(path: Path, series_uid: str | None) -> DWI:
    """Run dcm2niix on the series' own files and read back the 4D NIfTI that has gradients."""
    series = select_series(path, series_uid)
    try:
        binary = dcm2niix_executable()
    except VolumeError as exc:
        raise VolumeError(f"{path}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="revgan-dwi-") as tmp:
        source, out = Path(tmp) / "dicom", Path(tmp) / "nifti"
        source.mkdir()
        out.mkdir()
        for i, file in enumerate(series.files):  # links keep other series in the folder out
            (source / f"{i:06d}.dcm").symlink_to(file.resolve())
        command = [binary, "-z", "n", "-b", "n", "-d", "0", "-f", "dwi", "-o", str(out)]
        try:
            done = subprocess.run(command + [str(source)], capture_output=True, text=True,
                                  timeout=DCM2NIIX_TIMEOUT_S)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VolumeError(f"{path}: dcm2niix failed to run ({exc.__class__.__name__})") from None
        candidates = [n for n in sorted(out.glob("*.nii")) if all(f.is_file() for f in gradient_files(n))]
        if done.returncode != 0 and not candidates:
            lines = [ln for ln in (done.stderr + done.stdout).splitlines() if "rror" in ln]
            reason = lines[0].strip() if lines else f"exit code {done.returncode}"
            raise VolumeError(f"{path}: dcm2niix could not convert the series ({reason})")
        if not candidates:
            raise VolumeError(
                f"{path}: no diffusion gradients in this DICOM series (dcm2niix wrote no .bval/.bvec); "
                "is it a DWI series?"
            )
        dwi = max((load_dwi(n) for n in candidates), key=lambda d: d.data.shape[3])  # not a trace/ADC map
    if not (dwi.bvals > 50).any():
        raise VolumeError(f"{path}: no diffusion gradients in this DICOM series (every b-value is 0)")
    return dwi
