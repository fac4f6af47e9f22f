"""Degradations that make training pairs: thick-slice simulation, the way back to the HR grid, and a
simulated smooth/sharp CT kernel pair.

Geometry (voxel index i, affine A, factor f per axis): LR voxel k averages HR voxels f·k … f·k+f−1,
so its centre is HR index f·k + (f−1)/2 and ``A_lr = A_hr @ S`` with ``S = [diag(f), (f−1)/2; 0, 1]``.
Trailing HR voxels that do not fill a whole block are dropped (preprocess crops the HR volume to a
multiple of the factors first, so nothing is lost there); `upsample_to_hr` is the exact inverse
geometry: ``A_hr = A_lr @ S⁻¹`` on a grid of ``f·n`` voxels, or `hr_shape` (edge-padded or cropped).
Arrays are (x, y, z[, channel]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from revgan_med.tasks import DEFAULT_FACTORS, UPSAMPLE_MODES, parse_factors

SIMULATED_KERNEL_NOTE = (
    "SIMULATED kernel pair (Gaussian MTF + FBP-shaped noise), not a scanner reconstruction"
)


def _factors(factors: Sequence[int]) -> np.ndarray:
    return np.asarray(parse_factors(factors), dtype=int)


def block_matrix(factors: Sequence[int]) -> np.ndarray:
    """The 4×4 LR-index → HR-index matrix S (`A_lr = A_hr @ S`)."""
    f = _factors(factors).astype(np.float64)
    s = np.diag([*f, 1.0])
    s[:3, 3] = (f - 1.0) / 2.0
    return s


def thick_slice(
    array: np.ndarray, affine: np.ndarray, factors: Sequence[int] = DEFAULT_FACTORS
) -> tuple[np.ndarray, np.ndarray]:
    """Average `factors` consecutive voxels per axis → (LR array, LR affine); remainders are dropped."""
    f = _factors(factors)
    shape = np.asarray(array.shape[:3])
    n = shape // f
    if (n < 1).any():
        raise ValueError(f"thick_slice: volume {tuple(shape)} is smaller than the factors {tuple(f)}")
    hr = np.asarray(array, dtype=np.float32)[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]]
    extra = hr.shape[3:]
    blocks = hr.reshape(n[0], f[0], n[1], f[1], n[2], f[2], *extra)
    lr = blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
    return lr, np.asarray(affine, dtype=np.float64) @ block_matrix(f)


def _fit_shape(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Crop or edge-pad the spatial axes to `shape` (padding repeats the last voxel, like clamping)."""
    array = array[tuple(slice(0, s) for s in shape)]
    pad = [(0, max(0, s - c)) for s, c in zip(shape, array.shape[:3], strict=True)]
    pad += [(0, 0)] * (array.ndim - 3)
    return np.pad(array, pad, mode="edge") if any(p[1] for p in pad) else array


def _cubic_weights(m: int, n: int, f: int) -> np.ndarray:
    """(n, m) matrix of 1D centre-aligned cubic-spline interpolation from m LR to n HR samples.

    HR sample j lies at LR coordinate (j − (f − 1)/2) / f, clamped to the outermost LR centres. The
    tensor-product spline of scipy's ``map_coordinates(order=3, mode="nearest")`` is separable, so three
    small matrices applied along the axes give its 3D result without a coordinate array per voxel
    (MONAI's Resize has no centre-aligned cubic mode; torch has no 3D cubic interpolation).
    """
    from scipy.ndimage import map_coordinates

    coords = np.clip((np.arange(n) - (f - 1) / 2) / f, 0, m - 1)[None]
    basis = np.eye(m)
    columns = [map_coordinates(basis[k], coords, order=3, mode="nearest") for k in range(m)]
    return np.stack(columns, axis=1).astype(np.float32)


def upsample_to_hr(
    lr_array: np.ndarray,
    lr_affine: np.ndarray,
    factors: Sequence[int] = DEFAULT_FACTORS,
    mode: str = "nearest",
    hr_shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Map an LR volume onto the HR grid it was made from → (HR array, HR affine).

    "nearest" repeats each LR voxel over its block (the HCP setup, §5.3); "trilinear" interpolates
    between LR voxel centres (centre-aligned, values clamped beyond the outermost centres), which is
    exact for functions linear in the voxel index; "tricubic" is the cubic-spline version of the same
    geometry. `hr_shape` defaults to `factors × lr shape`.
    """
    f = _factors(factors)
    lr = np.asarray(lr_array, dtype=np.float32)
    full = tuple(int(v) for v in np.asarray(lr.shape[:3]) * f)
    if mode == "nearest":
        hr = lr
        for axis in range(3):
            hr = np.repeat(hr, f[axis], axis=axis)
    elif mode == "trilinear":
        # align_corners=False maps HR index j to LR coordinate (j − (f−1)/2)/f, clamped at the edges:
        # exactly the block-centre geometry above (the call MONAI's Resize makes, without its copies).
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(lr.reshape(*lr.shape[:3], -1), 3, 0)))
        up = F.interpolate(t[None], size=full, mode="trilinear", align_corners=False)[0]
        hr = np.moveaxis(up.numpy(), 0, 3).reshape(*full, *lr.shape[3:])
    elif mode == "tricubic":
        hr = lr
        for axis in range(3):
            n = full[axis] if hr_shape is None else int(hr_shape[axis])
            weights = _cubic_weights(lr.shape[axis], n, int(f[axis]))
            hr = np.moveaxis(np.tensordot(weights, hr, axes=(1, axis)), 0, axis)
    else:
        raise ValueError(f"upsample mode {mode!r}: expected one of {', '.join(UPSAMPLE_MODES)}")
    if hr_shape is not None:
        hr = _fit_shape(hr, tuple(int(s) for s in hr_shape[:3]))
    return np.ascontiguousarray(hr), np.asarray(lr_affine, dtype=np.float64) @ np.linalg.inv(block_matrix(f))


def input_support(
    lr_array: np.ndarray, lr_affine: np.ndarray, factors: Sequence[int], hr_shape: Sequence[int] | None = None
) -> np.ndarray:
    """Bool (x, y, z) on the HR grid: voxels whose LR voxel is non-zero in any channel.

    A masked DTI input (zero outside the brain) carries its brain mask this way, so training and
    inference can fit the DTI scaling inside the brain from the input alone (an interpolated input
    is non-zero almost everywhere).
    """
    lr = np.asarray(lr_array)
    support = (np.any(lr != 0, axis=-1) if lr.ndim == 4 else lr != 0).astype(np.float32)
    return upsample_to_hr(support, lr_affine, factors, mode="nearest", hr_shape=hr_shape)[0] > 0.5


def gaussian_mtf(freq: np.ndarray, mtf50: float) -> np.ndarray:
    """Gaussian MTF with MTF(mtf50) = 0.5; `freq` and `mtf50` in cycles/mm."""
    return np.exp(-np.log(2.0) * (freq / mtf50) ** 2)


def simulate_kernel_pair(
    hu: np.ndarray,
    spacing: Sequence[float],
    *,
    seed: int,
    smooth_mtf50: float = 0.35,
    sharp_mtf50: float = 0.70,
    sharp_boost: float = 0.6,
    noise_hu: tuple[float, float] = (8.0, 35.0),
) -> tuple[np.ndarray, np.ndarray]:
    """SIMULATED smooth and sharp reconstructions of one CT volume (x, y, z) in HU → (smooth, sharp).

    A clearly labelled simulation, not a scanner reconstruction: each axial slice is filtered in the
    frequency domain by a kernel MTF — a Gaussian with 50 % at `smooth_mtf50` / `sharp_mtf50`
    cycles/mm, the sharp one with an edge-enhancing gain ``1 + sharp_boost·(k/k_nyq)²`` — and one
    shared white-noise field (both kernels see the same projections) is shaped by the FBP noise
    power spectrum ``|k|·MTF(k)`` of each kernel and scaled to `noise_hu` standard deviations.
    """
    if hu.ndim != 3:
        raise ValueError(f"simulate_kernel_pair: expected a 3D volume, got shape {hu.shape}")
    sx, sy = float(spacing[0]), float(spacing[1])
    kx = np.fft.fftfreq(hu.shape[0], d=sx)[:, None]
    ky = np.fft.fftfreq(hu.shape[1], d=sy)[None, :]
    k = np.sqrt(kx**2 + ky**2)
    k_nyq = 0.5 / min(sx, sy)
    mtf_smooth = gaussian_mtf(k, smooth_mtf50)
    mtf_sharp = gaussian_mtf(k, sharp_mtf50) * (1.0 + sharp_boost * (k / k_nyq) ** 2)
    spectrum = np.fft.fft2(np.asarray(hu, dtype=np.float64), axes=(0, 1))
    noise = np.fft.fft2(np.random.default_rng(seed).standard_normal(hu.shape), axes=(0, 1))
    out = []
    for mtf, sigma in zip((mtf_smooth, mtf_sharp), noise_hu, strict=True):
        image = np.fft.ifft2(spectrum * mtf[..., None], axes=(0, 1)).real
        shaped = np.fft.ifft2(noise * (k * mtf)[..., None], axes=(0, 1)).real
        shaped *= sigma / max(float(shaped.std()), 1e-12)
        out.append((image + shaped).astype(np.float32))
    return out[0], out[1]
