"""Misalignment augmentation for registration-corrected training (RegGAN, ``004_*``).

RegGAN simulates imperfectly registered pairs by transforming source and target with INDEPENDENT random
affines whose size grows with a ``noise_level``: rotation up to ``noise_level`` degrees, translation up to
``0.02 * noise_level`` of the image size and scaling in ``1 ± 0.02 * noise_level`` (their data loader,
in 2D). Here the same ranges in 3D (rotation about each of the three axes) with MONAI `RandAffined`, one
per key, so every key gets its own transform. Level 0 leaves the pair untouched (aligned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Compose, RandAffined

__all__ = ["misalign_pair", "misalignment_ranges", "misalignment_transform"]


def misalignment_ranges(noise_level: float, spatial_size: Sequence[int]) -> dict[str, list[float]]:
    """RandAffine ranges of a RegGAN noise level: rotation (radians), translation (voxels), scale (±)."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if len(spatial_size) != 3:
        raise ValueError(f"spatial_size must have 3 entries (X, Y, Z), got {list(spatial_size)}")
    return {
        "rotate_range": [math.radians(noise_level)] * 3,
        "translate_range": [0.02 * noise_level * n for n in spatial_size],
        "scale_range": [0.02 * noise_level] * 3,
    }


def misalignment_transform(
    keys: Sequence[str],
    *,
    noise_level: float,
    spatial_size: Sequence[int],
    padding_mode: str = "border",
) -> Compose:
    """Dict transform giving each key in `keys` its own random affine of RegGAN level `noise_level`.

    Images are ``(C, X, Y, Z)``; `spatial_size` sets the translation range (a fraction of the size).
    Each output is a MONAI ``MetaTensor`` whose ``affine`` records the voxel transform that was applied
    (for an input without metadata, that matrix itself). Seed with ``set_random_state(seed)``.
    """
    ranges = misalignment_ranges(noise_level, spatial_size)
    prob = 1.0 if noise_level > 0 else 0.0
    return Compose([RandAffined(keys=key, prob=prob, padding_mode=padding_mode, **ranges) for key in keys])


def misalign_pair(
    source: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    *,
    noise_level: float,
    seed: int,
    padding_mode: str = "border",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Misalign two ``(C, X, Y, Z)`` images independently; returns both and their 4x4 voxel affines.

    The affines map output voxel coordinates to input voxel coordinates (identity when unchanged), so the
    misalignment actually applied is known to the experiment.
    """
    if tuple(source.shape) != tuple(target.shape) or len(source.shape) != 4:
        raise ValueError(
            f"source and target must be equal (C, X, Y, Z) arrays, got {tuple(source.shape)} "
            f"and {tuple(target.shape)}"
        )
    transform = misalignment_transform(
        ("source", "target"),
        noise_level=noise_level,
        spatial_size=source.shape[1:],
        padding_mode=padding_mode,
    )
    transform.set_random_state(seed)
    out = transform({"source": torch.as_tensor(source), "target": torch.as_tensor(target)})
    images = [torch.as_tensor(out[k]).as_subclass(torch.Tensor) for k in ("source", "target")]
    affines = [_voxel_affine(out[k]) for k in ("source", "target")]
    return images[0], images[1], affines[0], affines[1]


def _voxel_affine(image: torch.Tensor) -> np.ndarray:
    affine = getattr(image, "affine", None)
    return np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
