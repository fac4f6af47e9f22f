"""Gantry-tilted CT series: slices whose origins step sideways by a constant in-plane offset.

A tilted gantry acquires slices that are parallel but not stacked along their normal: the volume is
sheared along the slice axis. As dcm2niix does by default, each slice is shifted back in its own plane
(linear interpolation, so no HU overshoot) onto the orthogonal grid through the first slice; voxels that
no acquired slice covers take `fill`. The slice spacing of that grid is the spacing along the normal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from revgan_med.io.formats import VolumeError

TILT_MODES = ("correct", "refuse")


def sideways_shear(positions: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Of slice origins `positions` (n, 3) sorted along `normal`: (in-plane offset per slice in mm,
    how far any origin strays from that constant step, how far any strays from the line along the
    normal). The offset is zero when the origins lie on that line (no tilt)."""
    depth = positions @ normal
    sideways = (positions - positions[0]) - np.outer(depth - depth[0], normal)
    drift = float(np.linalg.norm(sideways, axis=1).max())
    if drift <= 0.01 + 1e-4 * (depth[-1] - depth[0]):
        return np.zeros(3), 0.0, drift
    per_mm = sideways[-1] / (depth[-1] - depth[0])  # a tilt shifts slices in proportion to their depth
    deviation = float(np.abs(sideways - np.outer(depth - depth[0], per_mm)).max())
    return per_mm * (depth[-1] - depth[0]) / (len(positions) - 1), deviation, drift


def tilt_degrees(shear: np.ndarray, step: float) -> float:
    """Gantry tilt angle of an in-plane offset `shear` (mm) per slice of spacing `step` (mm)."""
    return float(np.degrees(np.arctan2(np.linalg.norm(shear), step)))


def untilt(volume: np.ndarray, shift_per_slice: tuple[float, float], fill: float) -> np.ndarray:
    """Resample a sheared (x, y, z) volume onto the orthogonal grid through slice 0.

    Slice k of `volume` lies shifted by k · `shift_per_slice` voxels (along x, y) from where the
    orthogonal grid has it, so output[i, j, k] = volume[i − k·sx, j − k·sy, k].
    """
    from scipy.ndimage import shift

    out = np.empty_like(volume)
    for k in range(volume.shape[2]):
        offset = (k * shift_per_slice[0], k * shift_per_slice[1])
        out[:, :, k] = shift(volume[:, :, k], offset, order=1, mode="constant", cval=fill)
    return out


def correct_tilt(volume: np.ndarray, positions: np.ndarray, frame: tuple, step: float, *, where: Path,
                 tilt: str, notes: list[str] | None) -> np.ndarray:  # fmt: skip
    """`volume` (x, y, z) on the orthogonal grid when its slice origins `positions` (sorted along the
    normal, `step` mm apart) drift sideways by a gantry tilt; `frame` is (row, column, normal, pixel
    spacing). Refused (VolumeError naming `where`) with `tilt` "refuse" or when the drift is uneven."""
    row, col, normal, spacing = frame
    shear, deviation, drift = sideways_shear(positions, normal)
    if not shear.any():
        return volume
    if deviation >= 0.05:
        raise VolumeError(f"{where}: slice positions are scattered sideways by up to {drift:.3f} mm")
    angle = tilt_degrees(shear, step)
    if tilt == "refuse":
        raise VolumeError(
            f"{where}: gantry tilt of {angle:.2f} degrees (slice positions are not along the "
            "slice normal); reconstruct without tilt or resample the series before use"
        )
    if notes is not None:
        notes.append(f"gantry tilt {angle:.2f} deg corrected")
    return untilt(volume, (shear @ row / spacing[1], shear @ col / spacing[0]), fill=float(volume.min()))
