from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from revgan_med.data.datasets import PatchDataset, dihedral, load_case, load_datalist
from revgan_med.data.degradation import thick_slice
from revgan_med.data.sampling import crop, ct_body, pad_to_size, sample_origin
from revgan_med.data.transforms import CTWindow
from revgan_med.io import save_volume

WINDOW = (-1150.0, 350.0)
FACTORS = (2, 2, 4)


def test_pad_and_crop_by_hand():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    p = pad_to_size(a, (3, 3, 2), value=-7.0)
    assert p.shape == (1, 3, 3, 4)
    np.testing.assert_array_equal(p[:, :2], a)
    assert (p[:, 2] == -7.0).all()
    np.testing.assert_array_equal(crop(a, (1, 1, 2), (1, 2, 2)), a[:, 1:2, 1:3, 2:4])


def test_sample_origin_honours_the_foreground_fraction(rng):
    fg = np.zeros((32, 32, 32), bool)
    fg[20:32, 20:32, 20:32] = True
    for _ in range(50):
        o = sample_origin(fg, (8, 8, 8), min_fraction=0.25, rng=rng)
        assert crop(fg, o, (8, 8, 8)).mean() >= 0.25
    # impossible: the best candidate is returned instead of stalling
    o = sample_origin(np.zeros((16, 16, 16), bool), (8, 8, 8), min_fraction=0.5, rng=rng, max_tries=5)
    assert all(0 <= v <= 8 for v in o)
    with pytest.raises(ValueError, match="smaller than the patch"):
        sample_origin(fg, (40, 8, 8), min_fraction=0.0, rng=rng)


def _block_coded_case(folder, shape=(16, 16, 16), affine=None, *, body=None):
    """HR target whose value is constant on each 2×2×4 block and encodes the block's position, so the
    thick-slice input upsampled with nearest reproduces it exactly at the same world location."""
    affine = np.diag([0.7, 0.8, 1.5, 1.0]) if affine is None else affine
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    code = (i // 2) * 64 + (j // 2) * 8 + (k // 4)
    target = (-1000.0 + 2.5 * code).astype(np.float32)  # distinct values inside the window
    if body is not None:
        target[~body] = -1000.0
    lr, lr_affine = thick_slice(target, affine, FACTORS)
    folder.mkdir(parents=True)
    save_volume(lr, lr_affine, folder / "image.nii.gz")
    save_volume(target, affine, folder / "target.nii.gz")
    return {"image": str(folder / "image.nii.gz"), "target": str(folder / "target.nii.gz")}


def _dataset(cases, **kw):
    args = dict(task="ct-sr", intensity_or_window=list(WINDOW), patch_size=(8, 8, 8), samples_per_volume=6,
                foreground_fraction=0.0, factors=FACTORS, upsample="nearest", seed=0)  # fmt: skip
    args.update(kw)
    return PatchDataset(cases, **args)


def test_input_and_target_patches_come_from_the_same_world_location(tmp_path, oblique_affine):
    case = _block_coded_case(tmp_path / "a", affine=oblique_affine)
    ds = _dataset([case])
    assert len(ds) == 6
    for idx in range(len(ds)):
        item = ds[idx]
        assert item["image"].shape == item["target"].shape == (1, 8, 8, 8)
        assert item["image"].dtype == torch.float32
        torch.testing.assert_close(item["image"], item["target"])
    whole = load_case(
        case, task="ct-sr", intensity_or_window="chest-1024", factors=FACTORS, upsample="nearest"
    )
    np.testing.assert_allclose(whole["affine"], oblique_affine)
    np.testing.assert_array_equal(whole["image"], whole["target"])


def test_foreground_poor_patches_are_skipped(tmp_path):
    body = np.zeros((24, 24, 24), bool)
    body[16:24, 16:24, 16:24] = True
    ds = _dataset([_block_coded_case(tmp_path / "a", (24, 24, 24), body=body)], foreground_fraction=0.5)
    threshold = CTWindow(*WINDOW).normalize(np.float32([-500.0]))[0]
    for idx in range(len(ds)):
        assert (ds[idx]["target"] > threshold).float().mean() >= 0.5


def test_ct_body_fills_the_lungs_and_drops_what_lies_outside():
    hu = np.full((20, 20, 2), -1000.0, np.float32)
    hu[4:16, 4:16] = 40.0
    hu[7:13, 7:13] = -850.0  # a lung inside the body
    hu[0:2, 0:2] = 40.0  # a couch: a separate, smaller part
    body = ct_body(hu)
    assert body[4:16, 4:16].all() and body.sum() == 12 * 12 * 2
    assert ct_body(np.full((4, 4, 2), -1000.0)).all()  # no tissue at all: nothing is left out


def test_ct_body_counts_what_a_ring_encloses_before_choosing_the_largest_part():
    """A head-sized ring (a skull, 64 tissue voxels per slice, enclosing 36 of air) beside a U-shaped
    holder with more tissue voxels (82): the body is the ring and its inside, not the holder."""
    hu = np.full((40, 40, 3), -1000.0, np.float32)
    hu[2:12, 2:12] = 300.0  # ring: 10 × 10 outline of width 2 …
    hu[4:10, 4:10] = -1000.0  # … around 6 × 6 of air
    hu[20:38, 2:4] = hu[20:38, 9:11] = 300.0  # holder: two 18 × 2 arms …
    hu[36:38, 4:9] = 300.0  # … joined by a 2 × 5 base: 82 voxels, open at the top
    expected = np.zeros(hu.shape, bool)
    expected[2:12, 2:12] = True
    assert (hu > -500)[20:38].sum() > (hu > -500)[:12, :12].sum()  # the holder has more tissue
    np.testing.assert_array_equal(ct_body(hu), expected)


def test_body_patches_mark_the_target_patch_anatomy(tmp_path):
    """The lung of the target is in the body, the air around it is not; patches crop the same place."""
    hu = np.full((24, 24, 24), -1000.0, np.float32)
    hu[4:20, 4:20, :] = 40.0
    hu[9:15, 9:15, :] = -850.0
    folder = tmp_path / "case"
    folder.mkdir()
    for name in ("image", "target"):
        save_volume(hu, np.eye(4), folder / f"{name}.nii.gz")
    case = {"image": str(folder / "image.nii.gz"), "target": str(folder / "target.nii.gz")}
    ds = _dataset([case], task="ct-kernel", factors=(1, 1, 1), body=True, samples_per_volume=8)
    above_air, lung = CTWindow(*WINDOW).normalize(np.float32([-900.0, -850.0]))
    lungs = 0
    for index in range(len(ds)):
        item = ds[index]
        assert item["body"].dtype == torch.bool and item["body"].shape == (1, 8, 8, 8)
        assert torch.equal(item["body"], item["target"] > above_air)
        lungs += int(torch.isclose(item["target"], torch.tensor(lung)).sum())
    assert lungs > 0  # the patches did reach the lung
    assert "body" not in _dataset([case], task="ct-kernel", factors=(1, 1, 1))[0]
    with pytest.raises(ValueError, match="paired"):
        _dataset([case], task="ct-kernel", factors=(1, 1, 1), body=True, paired=False)


def test_streams_are_deterministic_per_seed_epoch_and_index(tmp_path):
    case = _block_coded_case(tmp_path / "a", (24, 24, 24))
    a, b = _dataset([case]), _dataset([case])
    for idx in (0, 3, 5):
        torch.testing.assert_close(a[idx]["target"], b[idx]["target"])
    first = [a[i]["target"] for i in range(len(a))]
    a.set_epoch(1)
    second = [a[i]["target"] for i in range(len(a))]
    assert any(not torch.equal(x, y) for x, y in zip(first, second, strict=True))
    c = _dataset([case], seed=5)
    assert any(not torch.equal(c[i]["target"], first[i]) for i in range(len(c)))


def test_dihedral_by_hand():
    """In-plane [[a, b], [c, d]] (x down, y across): mirrored along x [[c, d], [a, b]]; a quarter turn
    from x towards y [[b, d], [a, c]]; a mirror along z reverses the slices."""
    patch = np.array([[1, 2], [3, 4]], np.float32)[None, :, :, None]
    np.testing.assert_array_equal(dihedral(patch, [True, False, False], 0)[0, :, :, 0], [[3, 4], [1, 2]])
    np.testing.assert_array_equal(dihedral(patch, [False, False, False], 1)[0, :, :, 0], [[2, 4], [1, 3]])
    np.testing.assert_array_equal(dihedral(patch, [True, False, False], 1)[0, :, :, 0], [[4, 2], [3, 1]])
    slices = np.arange(3, dtype=np.float32).reshape(1, 1, 1, 3)
    np.testing.assert_array_equal(dihedral(slices, [False, False, True], 2)[0, 0, 0], [2, 1, 0])


def _variants(patch, turns):
    """Every mirror image (along any of the 3 axes) of `patch`, turned 0 … turns-1 quarter turns."""
    out = []
    for fx in (False, True):
        for fy in (False, True):
            for fz in (False, True):
                p = patch[:, ::-1] if fx else patch
                p = p[:, :, ::-1] if fy else p
                p = p[:, :, :, ::-1] if fz else p
                out += [np.rot90(p, k, axes=(1, 2)) for k in range(turns)]
    return out


@pytest.mark.parametrize("patch, turns", [((8, 8, 4), 4), ((8, 4, 8), 1)])
def test_augmented_patches_are_the_plain_ones_mirrored_and_turned_alike(tmp_path, patch, turns):
    """Each augmented item is its unaugmented patch in one of the 32 symmetries of a square-in-plane box
    (8 without turns where the patch is not square in-plane), the same one for input, target and body."""
    body = np.zeros((24, 24, 24), bool)
    body[2:22, 4:20, 3:21] = True
    case = _block_coded_case(tmp_path / "a", (24, 24, 24), body=body)
    plain = _dataset([case], patch_size=patch, samples_per_volume=24, body=True)
    augmented = _dataset([case], patch_size=patch, samples_per_volume=24, body=True, augment=True)
    seen = set()
    for index in range(len(plain)):
        item, reference = augmented[index], plain[index]
        assert item["target"].shape == item["body"].shape == (1, *patch)
        variants = {key: _variants(reference[key].numpy(), turns) for key in ("image", "target", "body")}
        matches = [k for k in range(8 * turns)
                   if all(np.array_equal(variants[key][k], item[key]) for key in variants)]  # fmt: skip
        assert matches, f"item {index} is no mirror image or quarter turn of its plain patch"
        seen.add(matches[0])
    assert len(seen) >= 5  # the 24 items drew many different symmetries, not always the identity
    with pytest.raises(ValueError, match="CT only"):
        _dataset([case], task="dmri-sr", augment=True)


def test_small_volumes_are_padded_and_unpaired_sampling_mixes_cases(tmp_path):
    small = _block_coded_case(tmp_path / "small", (4, 6, 8))
    ds = _dataset([small], patch_size=(8, 8, 8))
    item = ds[0]
    assert item["target"].shape == (1, 8, 8, 8)
    assert item["target"][0, 7, 7, 7] == pytest.approx(CTWindow(*WINDOW).normalize(np.float32([-1000.0]))[0])

    other = _block_coded_case(tmp_path / "other", (16, 16, 16))
    unpaired = _dataset([small, other], paired=False, samples_per_volume=10)
    targets = {bool((unpaired[i]["target"] == item["target"][0, 7, 7, 7]).any()) for i in range(10)}
    assert targets == {True, False}, "targets should come from both cases, independently of the input"


def test_dti_patches_have_six_channels(tmp_path, rng):
    hr = rng.normal(scale=1e-3, size=(16, 16, 16, 6)).astype(np.float32)
    lr, lr_affine = thick_slice(hr, np.eye(4), FACTORS)
    save_volume(lr, lr_affine, tmp_path / "image.nii.gz")
    save_volume(hr, np.eye(4), tmp_path / "target.nii.gz")
    case = {"image": str(tmp_path / "image.nii.gz"), "target": str(tmp_path / "target.nii.gz")}
    ds = _dataset([case], task="dmri-sr", upsample="trilinear")
    assert ds[0]["image"].shape == ds[0]["target"].shape == (6, 8, 8, 8)
    whole = load_case(case, task="dmri-sr", intensity_or_window="nlst", factors=FACTORS, upsample="trilinear")
    # scaled by the input's own robust scale: |normalised input| has its 99.5th percentile at 1
    np.testing.assert_allclose(np.percentile(np.abs(whole["image"]), 99.5, axis=(1, 2, 3)), 1.0, rtol=1e-3)


def test_load_datalist_resolves_paths_relative_to_the_file(tmp_path):
    _block_coded_case(tmp_path / "c1")
    (tmp_path / "datalist.json").write_text(
        json.dumps(
            {"training": [{"image": "c1/image.nii.gz", "target": "c1/target.nii.gz"}], "validation": []}
        )
    )
    items = load_datalist(tmp_path / "datalist.json", "training")
    assert items == [
        {"image": str(tmp_path / "c1/image.nii.gz"), "target": str(tmp_path / "c1/target.nii.gz")}
    ]
    with pytest.raises(ValueError, match="datalist.json"):
        load_datalist(tmp_path / "datalist.json", "testing")
