"""A procedural 3D chest CT phantom in HU, for the demo and fast tests (no real scans needed).

`make_phantom_labels` draws the anatomy as a label map: body ellipse (fat shell over muscle), two
lungs with branching vessel and airway trees, heart, a vertebral column (cortical shell, cancellous
core, discs) and ribs; the seed changes sizes, positions and the trees. `make_phantom` turns labels
into HU (`TISSUE_HU`), adds smooth tissue texture, partial-volume blur and correlated noise, or —
with `kernel` — a simulated smooth/sharp reconstruction of the same anatomy and noise.
Axes are (x: patient right→left is −x…+x as RAS, y: posterior→anterior, z: inferior→superior).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from revgan_med.data.degradation import simulate_kernel_pair

LABELS = {
    "air": 0, "fat": 1, "muscle": 2, "lung": 3, "heart": 4, "vessel": 5,
    "airway": 6, "airway_wall": 7, "cancellous": 8, "cortical": 9, "rib": 10, "disc": 11,
}  # fmt: skip
TISSUE_HU = {
    "air": -1000.0, "fat": -100.0, "muscle": 40.0, "lung": -850.0, "heart": 45.0, "vessel": 40.0,
    "airway": -1000.0, "airway_wall": 20.0, "cancellous": 450.0, "cortical": 1000.0, "rib": 700.0,
    "disc": 80.0,
}  # fmt: skip
TEXTURE_HU = {"lung": 25.0, "fat": 10.0, "muscle": 8.0, "heart": 6.0, "cancellous": 60.0}


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Voxel → RAS affine with the given spacing and the volume centred on the world origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape[:3], float) - 1.0) / 2.0 * np.asarray(spacing, float)
    return affine


def _world_grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    return [
        ((np.arange(n) - (n - 1) / 2.0) * s).reshape([-1 if a == i else 1 for a in range(3)])
        for i, (n, s) in enumerate(zip(shape, spacing, strict=True))
    ]


def _draw_tree(
    labels: np.ndarray, allowed: np.ndarray, *, start: np.ndarray, direction: np.ndarray, radius: float,
    length: float, depth: int, rng: np.random.Generator, spacing: np.ndarray, lumen: int, wall: int | None,
) -> None:  # fmt: skip
    """Rasterise a recursively branching tree of capsules (vessels, or airways with a wall) into `labels`."""
    direction = direction / np.linalg.norm(direction)
    end = start + direction * length
    reach = radius * (1.3 if wall is not None else 1.0)
    lo = np.maximum(np.floor((np.minimum(start, end) - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((np.maximum(start, end) + reach) / spacing).astype(int) + 1, labels.shape)
    if (hi > lo).all():
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        axes = [np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing, strict=True)]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        t = np.clip(((pts - start) @ (end - start)) / max(length**2, 1e-9), 0.0, 1.0)
        dist = np.linalg.norm(pts - (start + t[..., None] * (end - start)), axis=-1)
        sub, ok = labels[box], allowed[box]
        if wall is not None:
            sub[(dist < reach) & ok & (sub != lumen)] = wall
        sub[(dist < radius) & ok] = lumen
    if depth > 0:
        for sign in (-1.0, 1.0):
            turn = rng.normal(size=3)
            turn -= turn @ direction * direction
            child = direction + sign * 0.6 * turn / max(np.linalg.norm(turn), 1e-9)
            _draw_tree(labels, allowed, start=end, direction=child, radius=radius * 0.72,
                       length=length * rng.uniform(0.65, 0.85), depth=depth - 1, rng=rng,
                       spacing=spacing, lumen=lumen, wall=wall)  # fmt: skip


def make_phantom_labels(
    shape: Sequence[int] = (96, 96, 64), spacing: Sequence[float] = (1.0, 1.0, 1.0), *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The phantom's anatomy → (uint8 label map with `LABELS` values, affine)."""
    rng = np.random.default_rng(seed)
    shape, spacing = tuple(int(n) for n in shape[:3]), np.asarray(spacing[:3], float)
    x, y, z = _world_grid(shape, spacing)
    ext = np.asarray(shape) * spacing / 2.0
    a, b = ext[0] * rng.uniform(0.8, 0.92), ext[1] * rng.uniform(0.62, 0.75)
    taper = 1.0 + 0.08 * z / ext[2]  # the chest widens towards the shoulders
    body = (x / (a * taper)) ** 2 + (y / (b * taper)) ** 2
    labels = np.zeros(shape, np.uint8)
    labels[np.broadcast_to(body < 1.0, shape)] = LABELS["fat"]
    inner = np.broadcast_to(body < rng.uniform(0.72, 0.82), shape)
    labels[inner] = LABELS["muscle"]
    # ribs: thin elliptical arcs at regular heights, open anteriorly (cartilage/sternum omitted)
    rib_ring = np.abs(np.sqrt(body) - 0.86) < 1.8 / a
    rib_z = np.abs(((z + rng.uniform(0, 20)) % rng.uniform(15, 19)) - 5.0) < 2.5
    labels[np.broadcast_to(rib_ring & rib_z & ~((np.abs(x) < 0.25 * a) & (y > 0)), shape)] = LABELS["rib"]
    lungs = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        cx, cy = side * a * rng.uniform(0.38, 0.45), -b * rng.uniform(0.0, 0.1)
        rx, ry, rz = a * rng.uniform(0.3, 0.36), b * rng.uniform(0.55, 0.65), ext[2] * rng.uniform(0.9, 1.2)
        lungs |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - 0.2 * ext[2]) / rz) ** 2 < 1.0
    lungs &= inner
    labels[lungs] = LABELS["lung"]
    heart = (
        ((x + 0.12 * a) / (0.3 * a)) ** 2
        + ((y - 0.2 * b) / (0.38 * b)) ** 2
        + ((z + 0.2 * ext[2]) / (0.55 * ext[2])) ** 2
    )
    labels[np.broadcast_to(heart < rng.uniform(0.85, 1.15), shape) & inner] = LABELS["heart"]
    spine_r = np.sqrt(x**2 + (y + 0.68 * b) ** 2) / (0.16 * b)
    disc = np.abs((z % 24.0) - 12.0) < 2.0
    labels[np.broadcast_to(spine_r < 1.0, shape)] = LABELS["cortical"]
    labels[np.broadcast_to((spine_r < 0.8) & ~disc, shape)] = LABELS["cancellous"]
    labels[np.broadcast_to((spine_r < 1.0) & disc, shape)] = LABELS["disc"]
    origin = -(np.asarray(shape) - 1.0) / 2.0 * spacing  # index-space offset for the tree rasteriser
    for side in (-1.0, 1.0):
        hilum = np.array([side * a * 0.18, -0.05 * b, 0.1 * ext[2]])
        for kind, radius in (
            ("vessel", 2.2),
            ("vessel", 2.0),
            ("vessel", 1.8),
            ("vessel", 1.6),
            ("airway", 2.6),
        ):
            direction = np.array([side, rng.uniform(-0.7, 0.7), rng.uniform(-1.2, 1.2)])
            wall = LABELS["airway_wall"] if kind == "airway" else None
            _draw_tree(
                labels,
                lungs,
                start=hilum - origin,
                direction=direction,
                radius=radius,
                length=0.3 * a,
                depth=6,
                rng=rng,
                spacing=spacing,
                lumen=LABELS[kind],
                wall=wall,
            )
    return labels, phantom_affine(shape, spacing)


def make_phantom(
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    seed: int = 0,
    kernel: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A chest CT phantom → (float32 HU array (x, y, z), affine); different seeds give distinct cases.

    `kernel=None`: partial-volume blur plus correlated noise (≈ 15 HU); "smooth" / "sharp": the
    `simulate_kernel_pair` reconstructions of the same anatomy and noise (a matched pair for one seed).
    """
    if kernel not in (None, "smooth", "sharp"):
        raise ValueError(f"phantom kernel {kernel!r}: expected None, 'smooth' or 'sharp'")
    labels, affine = make_phantom_labels(shape, spacing, seed=seed)
    rng = np.random.default_rng([seed, 1])
    lut = np.zeros(max(LABELS.values()) + 1, np.float32)
    for name, value in LABELS.items():
        lut[value] = TISSUE_HU[name]
    hu = lut[labels]
    texture = gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), 2.0)
    texture /= max(float(texture.std()), 1e-6)
    for name, amplitude in TEXTURE_HU.items():
        sel = labels == LABELS[name]
        hu[sel] += amplitude * texture[sel]
    sigma_vox = 0.6 / np.asarray(spacing, float)  # ~0.6 mm system blur
    clean = gaussian_filter(hu, sigma_vox)
    if kernel is not None:
        smooth, sharp = simulate_kernel_pair(clean, spacing, seed=seed)
        return (smooth if kernel == "smooth" else sharp), affine
    noise = gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), 0.8)
    noise *= 15.0 / max(float(noise.std()), 1e-6)
    return (clean + noise).astype(np.float32), affine
