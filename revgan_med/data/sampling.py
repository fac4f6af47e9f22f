"""Foreground-aware random patch locations on channel-first volumes (C, X, Y, Z).

Our own code rather than MONAI's RandSpatialCropSamplesd / RandCropByPosNegLabeld: those draw from
the transform's own random state (not reproducible per sample index, so a resumed or distributed
stream differs) and cannot require a minimum foreground *fraction* (§5.3: skip patches with < 1 %).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

CT_FOREGROUND_HU = -500.0  # tissue threshold for CT (air and lung are below)


def ct_foreground(hu: np.ndarray) -> np.ndarray:
    """Tissue of a CT volume in HU: voxels above −500 HU (patch sampling's foreground; see `ct_body`)."""
    return np.asarray(hu) > CT_FOREGROUND_HU


def ct_body(hu: np.ndarray) -> np.ndarray:
    """The body of a CT volume (X, Y, Z) in HU: the voxels above −500 HU with their holes filled per
    axial slice, then the largest connected part of that, so the lungs are in and the couch and air are
    out (all True if none).

    Holes are filled before the largest part is chosen: a skull (or a chest wall) counts with what it
    encloses. Chosen first, the largest part of a head phantom's lower half was its U-shaped holder,
    which has more tissue-dense voxels than a skull that is thin or broken into pieces there.
    Scipy rather than MONAI's KeepLargestConnectedComponent + FillHoles: those fill in 3D, where the
    lungs reach the volume's top or bottom slice and stay open.
    """
    foreground = ct_foreground(hu)
    filled = np.stack([ndimage.binary_fill_holes(foreground[..., z]) for z in range(foreground.shape[2])], -1)
    labels, count = ndimage.label(filled)
    if count == 0:
        return np.ones(np.shape(hu), bool)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def xy_alike(factors: Sequence[int], patch_size: Sequence[int]) -> bool:
    """Whether a model sees x and y alike (same factor, same patch side), so that swapping or turning
    them in-plane is a symmetry of its task: training augmentation and the flip ensemble use it."""
    return factors[0] == factors[1] and patch_size[0] == patch_size[1]


def pad_to_size(array: np.ndarray, size: Sequence[int], *, value: float = 0.0) -> np.ndarray:
    """Pad the last three axes at their end to at least `size` with `value` (keeps the origin voxel)."""
    spatial = array.shape[-3:]
    pad = [(0, 0)] * (array.ndim - 3) + [(0, max(0, int(s) - n)) for s, n in zip(size, spatial, strict=True)]
    if not any(p[1] for p in pad):
        return array
    return np.pad(array, pad, mode="constant", constant_values=value)


def crop(array: np.ndarray, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The patch of `size` starting at voxel `origin` over the last three axes."""
    region = tuple(slice(int(o), int(o) + int(s)) for o, s in zip(origin, size, strict=True))
    return array[(Ellipsis, *region)]


def sample_origin(
    foreground: np.ndarray,
    size: Sequence[int],
    *,
    min_fraction: float,
    rng: np.random.Generator,
    max_tries: int = 20,
) -> tuple[int, int, int]:
    """A random patch origin whose patch holds ≥ `min_fraction` foreground.

    `foreground` is a spatial bool mask at least `size` large. Uniform candidates are drawn first
    (rejection sampling: uniform over the qualifying patches); when foreground is sparse and none of
    `max_tries` qualifies, candidates centred on random foreground voxels follow; after those the
    candidate with the most foreground is returned, so sampling never stalls on a nearly empty volume.
    """
    shape = np.asarray(foreground.shape[-3:])
    size = np.asarray(size, dtype=int)
    if (shape < size).any():
        raise ValueError(f"sample_origin: volume {tuple(shape)} is smaller than the patch {tuple(size)}")
    best, best_fraction = None, -1.0
    fg_voxels = None
    for attempt in range(2 * max_tries):
        if attempt < max_tries:
            origin = tuple(int(rng.integers(0, n + 1)) for n in shape - size)
        else:
            if fg_voxels is None:
                fg_voxels = np.flatnonzero(foreground)
                if fg_voxels.size == 0:
                    break
            centre = np.unravel_index(int(fg_voxels[rng.integers(fg_voxels.size)]), tuple(shape))
            jitter = rng.integers(-(size // 2), size - size // 2)
            origin = tuple(
                int(v) for v in np.clip(np.asarray(centre) - size // 2 + jitter // 2, 0, shape - size)
            )
        fraction = float(crop(foreground, origin, size).mean())
        if fraction >= min_fraction:
            return origin
        if fraction > best_fraction:
            best, best_fraction = origin, fraction
    return best
