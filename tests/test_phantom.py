from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from revgan_med.data.phantom import LABELS, make_phantom, make_phantom_labels

# expected HU of each tissue (textbook CT values), checked on the core of each region
HU_RANGES = {
    "air": (-1020, -980),
    "lung": (-900, -800),
    "fat": (-130, -70),
    "muscle": (20, 60),
    "heart": (25, 65),
    "cancellous": (400, 1000),
    "rib": (400, 1000),
}


def test_phantom_has_the_requested_geometry():
    hu, affine = make_phantom((96, 96, 64), (0.8, 0.8, 1.5), seed=1)
    assert hu.shape == (96, 96, 64) and hu.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.8, 0.8, 1.5])
    centre = affine[:3, :3] @ (np.array([95, 95, 63]) / 2.0) + affine[:3, 3]
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)


@pytest.fixture(scope="module")
def phantom0() -> tuple[np.ndarray, np.ndarray]:
    return make_phantom_labels(seed=0)[0], make_phantom(seed=0)[0]


@pytest.mark.parametrize("tissue", sorted(HU_RANGES))
def test_tissue_hu_ranges(tissue, phantom0):
    labels, hu = phantom0
    core = binary_erosion(labels == LABELS[tissue], iterations=1)
    assert core.sum() > 20, f"{tissue} is missing from the phantom"
    lo, hi = HU_RANGES[tissue]
    assert lo <= np.median(hu[core]) <= hi


def test_anatomy_is_present_and_bone_is_dense():
    labels, _ = make_phantom_labels(seed=2)
    for name in ("vessel", "airway", "airway_wall", "cortical", "heart", "lung"):
        assert (labels == LABELS[name]).sum() > 50, name
    hu, _ = make_phantom(seed=2)
    assert np.percentile(hu[labels == LABELS["cortical"]], 90) > 700
    assert np.median(hu[labels == LABELS["lung"]]) < -700  # vessels do not fill the lungs


def test_noise_is_realistic_and_spatially_correlated(phantom0):
    labels, hu = phantom0
    air = binary_erosion(labels == LABELS["air"], iterations=3)
    assert 8 < hu[air].std() < 30
    a = hu - hu.mean()
    neighbour_corr = np.corrcoef(np.where(air[:-1], a[:-1], 0).ravel(), np.where(air[:-1], a[1:], 0).ravel())[
        0, 1
    ]
    assert neighbour_corr > 0.2  # white noise would give ≈ 0


def test_seeds_give_distinct_cases_and_a_seed_is_reproducible(phantom0):
    la, a = phantom0
    b, _ = make_phantom(seed=1)
    np.testing.assert_array_equal(a, make_phantom(seed=0)[0])
    lb = make_phantom_labels(seed=1)[0]
    assert (la != lb).mean() > 0.03
    assert np.abs(a - b).mean() > 50


def test_kernels_are_a_matched_smooth_sharp_pair():
    smooth, _ = make_phantom((64, 64, 32), seed=4, kernel="smooth")
    sharp, _ = make_phantom((64, 64, 32), seed=4, kernel="sharp")
    assert np.corrcoef(smooth.ravel(), sharp.ravel())[0, 1] > 0.97  # same anatomy
    labels, _ = make_phantom_labels((64, 64, 32), seed=4)
    air = binary_erosion(labels == LABELS["air"], iterations=3)
    assert sharp[air].std() > 2 * smooth[air].std()  # sharp kernels are noisier
    with pytest.raises(ValueError, match="kernel"):
        make_phantom(kernel="bone")
