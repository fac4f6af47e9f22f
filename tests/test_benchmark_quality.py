"""The quality experiment (benchmarks/quality.py) at toy size on phantoms: table structure, the held-out
split, tuned filters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from quality import (
    ENSEMBLE,
    FITTED,
    KERNEL_PAIRS,
    LEAST_SQUARES,
    ODD_BORDER,
    TrainSettings,
    blur,
    by_structure,
    format_kernel,
    format_sr,
    least_squares_filter,
    main,
    run_kernel,
    run_sr,
    split_half,
    split_slab,
    structure_deciles,
    tune_filters,
    unsharp,
)
from scipy import ndimage

from revgan_med.data.phantom import make_phantom
from revgan_med.data.sampling import ct_body
from revgan_med.networks.linear import BLUR_SIGMAS


def _psnr(pred: np.ndarray, ref: np.ndarray, lo: float, hi: float, mask: np.ndarray) -> float:
    err = np.clip(pred, lo, hi)[mask].astype(np.float64) - np.clip(ref, lo, hi)[mask]
    return 10 * np.log10((hi - lo) ** 2 / np.mean(err**2))


def test_split_slab_keeps_geometry() -> None:
    hu = np.arange(4 * 4 * 40, dtype=np.float32).reshape(4, 4, 40)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    (train, a_train), (test, a_test) = split_slab(hu, affine, fraction=0.7, multiple=4)
    assert train.shape[2] == 28 and test.shape[2] == 40 - 36  # 0.7·40 → 28, gap of 2·4 slices
    np.testing.assert_array_equal(test, hu[..., 36:])
    assert np.allclose(a_test @ [0, 0, 0, 1], affine @ [0, 0, 36, 1]) and np.allclose(a_train, affine)


def test_split_half_is_disjoint_and_keeps_geometry() -> None:
    hu = np.arange(6 * 4 * 10, dtype=np.float32).reshape(6, 4, 10)
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    for axis in (0, 2):
        (first, a_first), (second, a_second) = split_half(hu, affine, axis)
        half = hu.shape[axis] // 2
        assert first.shape[axis] == second.shape[axis] == half
        np.testing.assert_array_equal(np.concatenate([first, second], axis=axis), hu)
        voxel = [0, 0, 0, 1]
        voxel[axis] = half
        assert np.allclose(a_second @ [0, 0, 0, 1], affine @ voxel) and np.allclose(a_first, affine)


def test_phantom_pair_halves_along_z(shared_data: Path) -> None:
    pair = KERNEL_PAIRS["phantom"]
    smooth, sharp, affine = pair.load(shared_data)
    assert smooth.shape == sharp.shape == (512, 512, 48) and pair.axis == 2
    (train, _), (test, test_affine) = split_half(smooth, affine, pair.axis)
    assert train.shape[2] == test.shape[2] == 24  # z < 24 trains, z >= 24 tests: no slice in both
    assert np.allclose(test_affine @ [0, 0, 0, 1], affine @ [0, 0, 24, 1])
    assert not np.array_equal(smooth, sharp)  # two kernels, one grid


def test_filters() -> None:
    ramp = np.zeros((9, 9, 3), np.float32)
    ramp[4, 4, 1] = 100.0
    assert np.isclose(blur(ramp, 1.0)[..., 1].sum(), 100.0)  # in-plane blur keeps the slice's mass
    assert np.array_equal(blur(ramp, 1.0)[..., 0], ramp[..., 0])  # and does not mix slices
    assert np.allclose(unsharp(ramp, 1.0, 0.0), ramp)
    # the odd-reflected border continues a ramp, so a symmetric filter leaves all of it; SciPy's
    # reflection bends it at the border
    line = np.broadcast_to(np.arange(12, dtype=np.float32)[:, None, None], (12, 10, 2))
    np.testing.assert_allclose(unsharp(line, 1.0, 4.0, border="odd-reflect"), line, atol=1e-4)
    assert abs(unsharp(line, 1.0, 4.0)[0] - line[0]).max() > 0.5


@pytest.fixture(scope="module")
def phantom_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    smooth, affine = make_phantom((64, 64, 20), (1.0, 1.0, 2.5), seed=3, kernel="smooth")
    sharp, _ = make_phantom((64, 64, 20), (1.0, 1.0, 2.5), seed=3, kernel="sharp")
    return smooth, sharp, affine


def test_tuned_filters_beat_doing_nothing_on_the_phantom_pair(phantom_pair) -> None:
    smooth, sharp, _ = phantom_pair
    mask = ct_body(smooth)
    tuned = tune_filters(smooth, sharp, mask)
    assert tuned["unsharp"]["psnr"] > _psnr(smooth, sharp, -900, 400, mask) + 0.5
    assert tuned["blur"]["psnr"] > _psnr(sharp, smooth, -900, 400, mask) + 0.5
    best = max(BLUR_SIGMAS, key=lambda s: _psnr(blur(sharp, s), smooth, -900, 400, mask))
    assert tuned["blur"]["sigma"] == best


@pytest.mark.slow
def test_kernel_experiment_toy(phantom_pair, tmp_path: Path) -> None:
    smooth, sharp, affine = phantom_pair
    # lr 0: the model is its least-squares linear paths, which must recover the simulated kernels' filters
    settings = TrainSettings(
        steps=2, lr=0.0, patch=(16, 16, 20), width=4, depth=1, disc_width=4, device="cpu"
    )
    result = run_kernel(smooth, sharp, affine, settings=settings, workdir=tmp_path, log=lambda m: None,
                        linear_start=True, ensemble=True)  # fmt: skip
    rows = result["rows"]
    assert [r["direction"] for r in rows] == ["smooth->sharp"] * 11 + ["sharp->smooth"] * 11
    models = [m + e for m in ("model (best.pt)", "model (last.pt)") for e in ("", ENSEMBLE)]
    methods = [LEAST_SQUARES, LEAST_SQUARES + ODD_BORDER, FITTED, FITTED + ENSEMBLE, *models]
    assert [r["method"] for r in rows if not r["method"].startswith(("nothing", "tuned"))] == methods * 2
    assert sum(r["method"].startswith("tuned") and r["method"].endswith(ODD_BORDER) for r in rows) == 2
    test_mask = ct_body(smooth[32:])
    nothing = rows[0]["psnr_body"]
    assert np.isclose(nothing, _psnr(smooth[32:], sharp[32:], -900, 400, test_mask))  # the held-out half
    hu_error = np.sqrt(np.mean((smooth[32:].astype(np.float64) - sharp[32:]) ** 2))  # no window, every voxel
    assert np.isclose(rows[0]["rmse_hu_all"], hu_error) and hu_error > rows[0]["rmse_all"]
    for direction in (rows[:11], rows[11:]):
        psnr = [r["psnr_body"] for r in direction]
        assert psnr[1] > psnr[0] and psnr[2] > psnr[0]  # tuned filter beats nothing, either border
        assert psnr[3] > psnr[0] + 3.0 and psnr[7] > psnr[0] + 3.0  # the least-squares filter and the model
        assert np.allclose(psnr[7::2], psnr[5]) and np.allclose(psnr[8::2], psnr[6])  # lr 0: models = start
        assert all(np.isfinite(r[k]) for r in direction for k in ("psnr_all", "mae_body", "ssim_body"))
    assert all(len(r["rmse_deciles"]) == 10 and np.isfinite(r["psnr_flat_floor"]) for r in rows)
    table = format_kernel(result)
    assert len(table.split("strongest edges")[1].splitlines()) == 2 + len(rows)  # header lines + a row each
    # a model equal to its fitted filter cannot beat the best classical filter by 0.5 dB
    targets = [line for line in table.splitlines() if "targets (body)" in line]
    assert len(targets) == 8  # best.pt and last.pt, each alone and as an ensemble, both directions
    for line in targets:
        best = line.split("- nothing")[0]
        assert ": NO)" in best and ("fitted linear filter" in best or "least-squares filter" in best)


def test_structure_deciles_rank_by_edges_and_the_floor_is_the_flattest_error() -> None:
    rng = np.random.default_rng(0)
    source = ndimage.gaussian_filter(rng.normal(0, 1, (40, 40, 3)), (2, 2, 0)) * 3000
    mask = np.zeros(source.shape, bool)
    mask[4:36, 4:36] = True
    deciles = structure_deciles(source, mask)
    assert (deciles[~mask] == -1).all()
    counts = np.bincount(deciles[mask], minlength=10)
    assert counts.max() - counts.min() <= 1  # deciles: a tenth of the mask each
    # central differences, independent of the Gaussian derivative: the top decile's edges are far steeper
    gx, gy = np.gradient(source, axis=0), np.gradient(source, axis=1)
    steep = np.hypot(gx, gy)
    assert steep[deciles == 9].mean() > 3 * steep[deciles == 0].mean()
    reference = np.zeros(source.shape, np.float32)  # inside the nlst window: nothing clipped
    prediction = reference + np.where(deciles >= 0, deciles + 1.0, 0.0)  # errors 1 … 10 HU by decile
    result = by_structure(prediction, reference, deciles)
    np.testing.assert_allclose(result["rmse_deciles"], np.arange(1, 11), rtol=1e-12)
    assert np.isclose(result["psnr_flat_floor"], 20 * np.log10(1300.0))  # every decile at 1 HU
    flat = np.zeros(source.shape)  # a plateau: every tie in the flattest decile, the others empty
    ties = structure_deciles(flat, mask)
    assert (ties[mask] == 0).all()
    one = by_structure(reference + 2.0, reference, ties)
    assert one["rmse_deciles"][0] == 2.0 and np.isnan(one["rmse_deciles"][1:]).all()
    assert np.isclose(one["psnr_flat_floor"], 20 * np.log10(1300.0 / 2.0))


def test_least_squares_filter_recovers_a_known_kernel_inside_the_mask() -> None:
    rng = np.random.default_rng(0)
    source = rng.normal(0, 100, (20, 18, 3)).astype(np.float32)
    weights = np.array([[0, -1, 0], [-1, 6, -1], [0, -1, 0]], np.float32)
    target = ndimage.correlate(source, weights[:, :, None], mode="nearest") + 20.0
    mask = np.zeros(source.shape, bool)
    mask[4:16, 3:15] = True
    target[~mask] = rng.normal(0, 1000, int((~mask).sum()))  # outside the mask: no relation at all
    apply = least_squares_filter(source, target, mask, (3, 3, 1))
    fresh = rng.normal(0, 100, (10, 10, 2)).astype(np.float32)
    expected = ndimage.correlate(fresh, weights[:, :, None], mode="nearest") + 20.0
    np.testing.assert_allclose(apply(fresh), expected, atol=0.05)
    odd = np.pad(fresh, ((1, 1), (1, 1), (0, 0)), mode="reflect", reflect_type="odd")
    odd = np.clip(odd, fresh.min(), fresh.max())  # `pad_volume` keeps the volume's range
    expected = ndimage.correlate(odd, weights[:, :, None])[1:-1, 1:-1] + 20.0
    np.testing.assert_allclose(apply(fresh, border="odd-reflect"), expected, atol=0.05)


@pytest.mark.slow
def test_sr_experiment_toy(tmp_path: Path) -> None:
    train = {"a": make_phantom((48, 48, 48), seed=1), "b": make_phantom((40, 48, 32), seed=3)}
    test = make_phantom((32, 32, 34), seed=2)  # 34 slices: cropped to whole blocks of 4
    settings = TrainSettings(steps=2, patch=(24, 24, 24), width=4, depth=1, disc_width=4, device="cpu")
    result = run_sr(train, {"phantom": test}, settings=settings, workdir=tmp_path, log=lambda m: None,
                    extra=["train.betas=[0.9,0.999]"], ensemble=True)  # fmt: skip
    assert result["train_shapes"] == {"a": [48, 48, 48], "b": [40, 48, 32]}
    datalist = json.loads((tmp_path / "prep" / "datalist.json").read_text())
    assert len(datalist["training"]) == 2 and datalist["validation"] == []  # both scans train
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["model", "ensemble", "tricubic", "trilinear"]
    assert all(np.isfinite(r[k]) for r in rows.values() for k in ("mae", "psnr", "ssim"))
    # tricubic interpolation of block averages is closer to the smooth phantom than block repeats
    assert rows["tricubic"]["psnr"] > 20.0
    table = format_sr(result)
    assert "target model >= tricubic + 1.0 dB" in table and "; train.betas=[0.9,0.999]" in table


def test_script_help_lists_its_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--kernel-steps" in capsys.readouterr().out
