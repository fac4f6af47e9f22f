from __future__ import annotations

import numpy as np
import pytest

from revgan_med.data.transforms import (
    CTWindow,
    DTIScale,
    IntensityMapd,
    brain_mask,
    fit_dti,
    intensity_for_task,
    intensity_from_dict,
    interior_mask,
    parse_window,
)
from revgan_med.tasks import WINDOWS


def test_parse_window_accepts_presets_strings_and_lists():
    assert parse_window("chest-1024") == (-1150.0, 350.0)
    assert parse_window("nlst") == (-900.0, 400.0)
    assert parse_window("-1000,500") == (-1000.0, 500.0)
    assert parse_window([-200, 300.5]) == (-200.0, 300.5)
    assert parse_window("ct-full") == (-1024.0, 3071.0)  # the 12-bit scanner range
    assert set(WINDOWS) == {"chest-1024", "nlst", "ct-full"}


@pytest.mark.parametrize("bad", ["lung", "1,2,3", "5,5", "400,-100", [1.0], "a,b", None, 7])
def test_parse_window_rejects_bad_values_naming_them(bad):
    with pytest.raises(ValueError, match="window"):
        parse_window(bad)


def test_ct_window_matches_hand_values_with_clipping():
    w = CTWindow(-1150.0, 350.0)
    hu = np.array([-1150.0, 350.0, -400.0, -775.0, -25.0, -3000.0, 2000.0], np.float32)
    expected = np.array([-1.0, 1.0, 0.0, -0.5, 0.5, -1.0, 1.0], np.float32)
    np.testing.assert_allclose(w.normalize(hu), expected, atol=1e-6)
    assert w.normalize(hu).dtype == np.float32


def test_ct_window_inverse_is_exact_on_the_window_and_clips_outside(rng):
    w = CTWindow(*WINDOWS["nlst"])
    y = rng.uniform(-1, 1, size=(8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(w.normalize(w.denormalize(y)), y, atol=1e-6)
    hu = rng.uniform(-2000, 2000, size=(8, 8, 8)).astype(np.float32)
    # clipped values cannot come back: the round trip is the clipped input
    np.testing.assert_allclose(w.denormalize(w.normalize(hu)), np.clip(hu, -900, 400), atol=1e-3)


def test_mappings_round_trip_through_plain_dicts(rng):
    w = intensity_from_dict(CTWindow(-900, 400).to_dict())
    assert isinstance(w, CTWindow) and (w.lo, w.hi) == (-900.0, 400.0)
    dti = rng.normal(size=(6, 6, 6, 6)).astype(np.float32)
    fitted = DTIScale().fit(dti)
    again = intensity_from_dict(fitted.to_dict())
    np.testing.assert_array_equal(again.normalize(dti), fitted.normalize(dti))
    with pytest.raises(ValueError, match="kind"):
        intensity_from_dict({"kind": "zscore"})


def test_dti_scale_divides_each_channel_by_its_robust_scale():
    vol = np.zeros((10, 10, 10, 6), np.float32)
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 2:8, 2:8] = True
    scales = np.array([1e-3, -2e-4, 8e-4, 5e-5, 3e-4, 1.2e-3])
    vol[mask] = scales  # constant per channel inside the mask: every percentile of |value| is |scale|
    vol[0, 0, 0] = 1.0  # an outlier outside the mask must not matter
    fitted = DTIScale(99.5).fit(vol, mask)
    np.testing.assert_allclose(fitted.scales, np.abs(scales), rtol=1e-6)
    out = fitted.normalize(vol)
    np.testing.assert_allclose(out[mask], np.sign(scales)[None].repeat(mask.sum(), 0), rtol=1e-5)
    np.testing.assert_allclose(fitted.denormalize(out), vol, rtol=1e-6)
    first = fitted.normalize(np.moveaxis(vol, -1, 0), channel_axis=0)
    np.testing.assert_allclose(first, np.moveaxis(out, -1, 0))
    with pytest.raises(ValueError, match="not fitted"):
        DTIScale().normalize(vol)


def test_intensity_for_task():
    assert isinstance(intensity_for_task("ct-sr", "nlst"), CTWindow)
    assert intensity_for_task("dmri-sr", "nlst").scales is None
    with pytest.raises(ValueError, match="task"):
        intensity_for_task("mr-sr", "nlst")


def test_intensity_mapd_is_invertible(rng):
    hu = rng.uniform(-1150, 350, size=(1, 6, 6, 6)).astype(np.float32)
    t = IntensityMapd(["image", "target"], mapping=CTWindow(-1150, 350))
    out = t({"image": hu, "target": hu + 1})
    np.testing.assert_allclose(out["image"], (hu + 400) / 750, atol=1e-6)
    back = t.inverse(out)
    np.testing.assert_allclose(back["image"], hu, atol=1e-3)
    np.testing.assert_allclose(back["target"], hu + 1, atol=1e-3)

    dti = rng.normal(scale=1e-3, size=(6, 5, 5, 5)).astype(np.float32)
    td = IntensityMapd(["image"], mapping=DTIScale(100.0), fit_key="image")
    out = td({"image": dti})
    np.testing.assert_allclose(np.abs(out["image"]).reshape(6, -1).max(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(td.inverse(out)["image"], dti, rtol=1e-5)


def test_interior_mask_is_erosion_by_a_5_cube():
    mask = np.zeros((15, 15, 15), bool)
    mask[3:12, 3:12, 3:12] = True  # 9³ cube: voxels 2 away from its faces remain, a 5³ cube
    expected = np.zeros_like(mask)
    expected[5:10, 5:10, 5:10] = True
    np.testing.assert_array_equal(interior_mask(mask), expected)
    touching = np.ones((6, 6, 6), bool)  # the volume border counts as outside
    assert interior_mask(touching).sum() == 2**3


def test_fit_dti_recovers_a_known_tensor_in_lower_triangular_order():
    # Dxx, Dxy, Dyy, Dxz, Dyz, Dzz (FSL/dipy order), a valid positive-definite tensor in mm²/s
    lt = np.array([1.5e-3, 0.2e-3, 0.9e-3, -0.1e-3, 0.15e-3, 0.6e-3])
    d = np.array([[lt[0], lt[1], lt[3]], [lt[1], lt[2], lt[4]], [lt[3], lt[4], lt[5]]])
    dirs = np.array(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, -1, 0], [1, 0, -1]], float
    )
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.full(len(dirs), 1000.0)]
    bvecs = np.r_[[[0.0, 0.0, 0.0]], dirs]
    signal = 1000.0 * np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, d, bvecs))
    dwi = np.broadcast_to(signal, (3, 3, 3, len(bvals))).copy()
    out = fit_dti(dwi, bvals, bvecs.T)  # (3, n) as in an FSL .bvec file
    assert out.shape == (3, 3, 3, 6)
    np.testing.assert_allclose(out[1, 1, 1], lt, atol=1e-6)


def test_real_dwi_tensor_fit_and_mask(shared_data):
    from dipy.io import read_bvals_bvecs

    from revgan_med.io import load_volume

    folder = shared_data / "dwi_brain_philips"
    dwi, _ = load_volume(folder / "701_DTI_Biobank_2mm_MB3S2_EPI.nii.gz")
    bvals, bvecs = read_bvals_bvecs(
        str(folder / "701_DTI_Biobank_2mm_MB3S2_EPI.bval"), str(folder / "701_DTI_Biobank_2mm_MB3S2_EPI.bvec")
    )
    mask = brain_mask(dwi, bvals)
    assert 0.1 < mask.mean() < 0.7, "a brain slab fills part of the field of view"
    dti = fit_dti(dwi, bvals, bvecs, mask)
    assert dti.shape == (*dwi.shape[:3], 6)
    md = (dti[..., 0] + dti[..., 2] + dti[..., 5]) / 3.0
    inner = interior_mask(mask)
    assert inner.sum() > 0 and not dti[~mask].any()
    # brain mean diffusivity at b=1000 is about 0.7–0.9e-3 mm²/s (CSF up to 3e-3)
    assert 5e-4 < np.median(md[inner]) < 1.3e-3


def test_brain_mask_keeps_the_largest_component_and_fills_its_holes():
    # a bright "brain" ball with a dark "ventricle" inside and a separate bright "eye"
    x, y, z = np.meshgrid(*(np.arange(n) for n in (40, 40, 24)), indexing="ij")
    brain = (x - 20) ** 2 + (y - 18) ** 2 + ((z - 12) * 1.5) ** 2 < 12**2
    ventricle = (x - 20) ** 2 + (y - 18) ** 2 + ((z - 12) * 1.5) ** 2 < 4**2
    eye = (x - 20) ** 2 + (y - 36) ** 2 + (z - 12) ** 2 < 3**2
    b0 = np.where(brain & ~ventricle, 1000.0, 0.0) + np.where(eye, 1000.0, 0.0)
    b0 += np.random.default_rng(0).normal(0, 10, b0.shape)
    mask = brain_mask(np.stack([b0, b0 * 0.5], axis=-1), np.array([0.0, 1000.0]))
    assert mask[ventricle].all() and not mask[eye].any()
    assert (mask ^ brain).mean() < 0.01  # the ball itself, up to its rim
