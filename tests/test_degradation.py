from __future__ import annotations

import numpy as np
import pytest

from revgan_med.data.degradation import simulate_kernel_pair, thick_slice, upsample_to_hr


def _world(affine: np.ndarray, index) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(index, float) + affine[:3, 3]


def test_thick_slice_values_and_affine_by_hand():
    i, j, k = np.meshgrid(np.arange(4), np.arange(4), np.arange(4), indexing="ij")
    hr = (16 * i + 4 * j + k).astype(np.float32)
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    lr, lr_affine = thick_slice(hr, affine, (2, 2, 4))
    assert lr.shape == (2, 2, 1)
    # block (0,0,0) averages i,j ∈ {0,1}, k ∈ {0..3}: 16·0.5 + 4·0.5 + 1.5
    assert lr[0, 0, 0] == pytest.approx(11.5)
    assert lr[1, 1, 0] == pytest.approx(16 * 2.5 + 4 * 2.5 + 1.5)
    assert lr[1, 0, 0] == pytest.approx(16 * 2.5 + 4 * 0.5 + 1.5)
    expected = np.diag([1.0, 1.0, 4.0, 1.0])
    expected[:3, 3] = [10.25, 20.25, 31.5]  # origin moves by (f−1)/2 HR voxels
    np.testing.assert_allclose(lr_affine, expected, atol=1e-12)


def test_lr_voxel_centres_are_the_centres_of_their_blocks(oblique_affine):
    lr, lr_affine = thick_slice(np.zeros((8, 6, 12), np.float32), oblique_affine, (2, 3, 4))
    for idx in [(0, 0, 0), (3, 1, 2), (1, 0, 1)]:
        block = [[f * n + d for d in range(f)] for n, f in zip(idx, (2, 3, 4), strict=True)]
        corners = np.array(
            [_world(oblique_affine, (a, b, c)) for a in block[0] for b in block[1] for c in block[2]]
        )
        np.testing.assert_allclose(_world(lr_affine, idx), corners.mean(axis=0), atol=1e-9)


def test_sizes_not_divisible_drop_the_remainder_and_channels_are_kept(rng):
    hr = rng.normal(size=(5, 5, 9, 2)).astype(np.float32)
    lr, _ = thick_slice(hr, np.eye(4), (2, 2, 4))
    assert lr.shape == (2, 2, 2, 2)
    assert lr[1, 0, 1, 1] == pytest.approx(hr[2:4, 0:2, 4:8, 1].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="smaller than the factors"):
        thick_slice(hr[:1], np.eye(4), (2, 2, 4))


@pytest.mark.parametrize("mode", ["nearest", "trilinear", "tricubic"])
def test_round_trip_geometry_is_exact(oblique_affine, mode):
    hr = np.zeros((8, 6, 16), np.float32)
    lr, lr_affine = thick_slice(hr, oblique_affine, (2, 2, 4))
    back, back_affine = upsample_to_hr(lr, lr_affine, (2, 2, 4), mode=mode)
    assert back.shape == hr.shape
    np.testing.assert_allclose(back_affine, oblique_affine, rtol=0, atol=1e-12)


def test_nearest_repeats_each_lr_voxel_over_its_block(rng):
    lr = rng.normal(size=(3, 2, 2)).astype(np.float32)
    hr, _ = upsample_to_hr(lr, np.eye(4), (2, 2, 4), mode="nearest")
    i, j, k = np.meshgrid(np.arange(6), np.arange(4), np.arange(8), indexing="ij")
    np.testing.assert_array_equal(hr, lr[i // 2, j // 2, k // 4])


def test_trilinear_is_centre_aligned_and_exact_for_linear_functions():
    i, j, k = np.meshgrid(np.arange(8), np.arange(8), np.arange(16), indexing="ij")
    hr = (3.0 * i - 2.0 * j + 0.5 * k + 7.0).astype(np.float32)
    lr, lr_affine = thick_slice(hr, np.eye(4), (2, 2, 4))  # block means = ramp at the block centres
    up, _ = upsample_to_hr(lr, lr_affine, (2, 2, 4), mode="trilinear")
    # inside the outermost LR centres (HR index 0.5…6.5 in x/y, 1.5…13.5 in z) the ramp comes back exactly
    inside = (slice(1, 7), slice(1, 7), slice(2, 14))
    np.testing.assert_allclose(up[inside], hr[inside], atol=1e-4)
    # beyond them the value is clamped to the outermost LR centre (edge), not extrapolated
    np.testing.assert_allclose(up[0, 3, 5], hr[1, 3, 5] - 3.0 * 0.5, atol=1e-4)  # the ramp at x = 0.5
    np.testing.assert_allclose(up[3, 3, 0], up[3, 3, 1], atol=1e-4)  # z = 0, 1 both clamp to z = 1.5


def test_tricubic_equals_the_3d_spline_at_the_block_centre_coordinates(rng):
    from scipy.ndimage import map_coordinates

    lr = rng.normal(size=(4, 3, 5, 2)).astype(np.float32)
    hr_shape = (9, 6, 19)  # one extra voxel in x and a dropped one in z, as `hr_shape` allows
    up, _ = upsample_to_hr(lr, np.eye(4), (2, 2, 4), mode="tricubic", hr_shape=hr_shape)
    # independent reference: scipy's 3D spline evaluated at every HR voxel's LR coordinate
    axes = [np.clip((np.arange(n) - (f - 1) / 2) / f, 0, m - 1)
            for n, f, m in zip(hr_shape, (2, 2, 4), lr.shape[:3], strict=True)]  # fmt: skip
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    for c in range(2):
        expected = map_coordinates(lr[..., c].astype(np.float64), coords, order=3, mode="nearest")
        np.testing.assert_allclose(up[..., c], expected, atol=1e-5)
    # at the LR centres themselves the spline interpolates: HR x = 2k + 0.5 is between voxels, but
    # with factor 1 along an axis every HR voxel is an LR centre
    same, _ = upsample_to_hr(lr[..., 0], np.eye(4), (1, 1, 1), mode="tricubic")
    np.testing.assert_allclose(same, lr[..., 0], atol=1e-5)


def test_hr_shape_pads_the_dropped_remainder_with_the_edge(rng):
    hr = rng.normal(size=(5, 4, 9)).astype(np.float32)
    lr, lr_affine = thick_slice(hr, np.eye(4), (2, 2, 4))
    up, affine = upsample_to_hr(lr, lr_affine, (2, 2, 4), mode="nearest", hr_shape=hr.shape)
    assert up.shape == hr.shape
    np.testing.assert_allclose(affine, np.eye(4), atol=1e-12)
    np.testing.assert_array_equal(up[4], up[3])
    np.testing.assert_array_equal(up[:, :, 8], up[:, :, 7])
    with pytest.raises(ValueError, match="mode"):
        upsample_to_hr(lr, lr_affine, (2, 2, 4), mode="cubic")


def test_simulated_kernels_blur_and_sharpen_with_documented_noise():
    step = np.full((64, 64, 4), -1000.0, np.float32)
    step[32:] = 0.0
    smooth, sharp = simulate_kernel_pair(step, (0.7, 0.7, 1.0), seed=3)
    again, _ = simulate_kernel_pair(step, (0.7, 0.7, 1.0), seed=3)
    np.testing.assert_array_equal(smooth, again)
    flat = np.zeros((64, 64, 4), np.float32)
    s_flat, h_flat = simulate_kernel_pair(flat, (0.7, 0.7, 1.0), seed=1)
    assert s_flat.std() == pytest.approx(8.0, rel=0.05) and h_flat.std() == pytest.approx(35.0, rel=0.05)

    def edge_width(img):  # 10–90 % rise distance along x, averaged over rows (noise averages out)
        profile = img.mean(axis=(1, 2))
        lo, hi = profile[16], profile[48]
        return np.sum((profile > lo + 0.1 * (hi - lo)) & (profile < lo + 0.9 * (hi - lo)))

    assert edge_width(smooth) > edge_width(sharp)
    assert abs(smooth[40:56].mean()) < 5 and abs(sharp[40:56].mean()) < 10  # MTF(0) = 1 keeps the HU


def test_input_support_is_the_non_zero_lr_voxels_on_the_hr_grid():
    from revgan_med.data.degradation import input_support

    lr = np.zeros((4, 3, 2, 6), np.float32)
    lr[1, 2, 0, 3] = -1.0  # one voxel, one channel non-zero
    support = input_support(lr, np.eye(4), (2, 2, 4), hr_shape=(8, 6, 7))
    expected = np.zeros((8, 6, 7), bool)
    expected[2:4, 4:6, 0:4] = True
    np.testing.assert_array_equal(support, expected)
