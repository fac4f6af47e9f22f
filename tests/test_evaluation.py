"""Metrics against hand-computed values and scikit-image; evaluate CLI and figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from revgan_med.evaluation import compute_metrics


def test_metrics_hand_values() -> None:
    reference = np.zeros((12, 12, 12))
    prediction = reference.copy()
    prediction[:6] = 2.0  # half the voxels off by 2: MAE 1, MSE 2
    m = compute_metrics(prediction, reference, data_range=10.0)
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(np.sqrt(2.0))
    assert m["psnr"] == pytest.approx(10 * np.log10(100 / 2))


def test_identical_volumes_are_perfect(rng: np.random.Generator) -> None:
    x = rng.normal(size=(16, 16, 16))
    m = compute_metrics(x, x, data_range=8.0)
    assert m["mae"] == 0 and m["psnr"] == float("inf") and m["ssim"] == pytest.approx(1.0)


def test_metrics_match_scikit_image(rng: np.random.Generator) -> None:
    reference = rng.uniform(-1000, 300, size=(24, 20, 16))
    reference[4:18, 5:15, 3:12] += 400  # some structure for SSIM
    prediction = reference + rng.normal(scale=40, size=reference.shape)
    m = compute_metrics(prediction, reference, data_range=1500.0)
    assert m["psnr"] == pytest.approx(peak_signal_noise_ratio(reference, prediction, data_range=1500.0))
    expected = structural_similarity(
        reference,
        prediction,
        data_range=1500.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert m["ssim"] == pytest.approx(expected, rel=1e-9)
    assert m["mae"] == pytest.approx(np.abs(prediction - reference).mean())


def test_mask_restricts_every_metric(rng: np.random.Generator) -> None:
    reference = rng.normal(size=(32, 16, 16))
    prediction = reference.copy()
    prediction[:16] += 3.0  # error only in the first half
    mask = np.zeros(reference.shape, dtype=bool)
    mask[16:] = True
    m = compute_metrics(prediction, reference, data_range=5.0, mask=mask)
    assert m["mae"] == 0.0 and m["psnr"] == float("inf")
    # SSIM windows near the boundary still see the error, deep inside the mask they do not
    deep = np.zeros_like(mask)
    deep[22:] = True  # beyond the 5-voxel Gaussian radius
    assert compute_metrics(prediction, reference, data_range=5.0, mask=deep)["ssim"] == pytest.approx(1.0)


def test_channel_axis_and_small_volumes(rng: np.random.Generator) -> None:
    reference = rng.normal(size=(9, 10, 6, 3))  # thinner than the 11-voxel SSIM window: 5-voxel crop
    prediction = reference + rng.normal(scale=0.3, size=reference.shape)
    m = compute_metrics(prediction, reference, data_range=4.0, channel_axis=-1)
    assert m["mae"] == pytest.approx(np.abs(prediction - reference).mean())
    expected = structural_similarity(
        reference,
        prediction,
        data_range=4.0,
        channel_axis=-1,
        gaussian_weights=True,
        win_size=5,
        use_sample_covariance=False,
    )
    assert m["ssim"] == pytest.approx(expected, rel=1e-9)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), data_range=1.0)


def _smooth_volume(shape=(24, 20, 32)) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(0, np.pi, n) for n in shape), indexing="ij")
    return (-600 + 500 * np.sin(x) * np.cos(0.5 * y) * np.sin(z + 0.3)).astype(np.float32)


def test_baselines_are_centre_aligned(oblique_affine: np.ndarray) -> None:
    from scipy.ndimage import zoom

    from revgan_med.data.degradation import thick_slice
    from revgan_med.evaluation import baseline_volume

    hr = _smooth_volume()
    lr, lr_affine = thick_slice(hr, oblique_affine, (2, 2, 4))
    cubic, affine = baseline_volume("tricubic", lr, lr_affine, factors=(2, 2, 4), hr_shape=hr.shape)
    np.testing.assert_allclose(affine, oblique_affine, atol=1e-9)
    # scipy's zoom(grid_mode=True) aligns voxel edges, i.e. centres: equal away from the clamped border
    expected = zoom(lr.astype(np.float64), (2, 2, 4), order=3, grid_mode=True, mode="nearest")
    inner = (slice(2, -2), slice(2, -2), slice(4, -4))
    np.testing.assert_allclose(cubic[inner], expected[inner], atol=1e-3)
    # a linear ramp is reproduced exactly by both interpolations between the outermost LR centres
    # (the cubic spline's boundary condition fades within a few LR voxels of the ends)
    ramp = np.broadcast_to(np.arange(160, dtype=np.float32) * 10.0, (4, 4, 160)).copy()
    lr_ramp, lr_ramp_affine = thick_slice(ramp, np.eye(4), (1, 1, 4))
    for name, keep in (("trilinear", slice(2, -2)), ("tricubic", slice(40, -40))):
        up, _ = baseline_volume(name, lr_ramp, lr_ramp_affine, factors=(1, 1, 4), hr_shape=ramp.shape)
        np.testing.assert_allclose(up[..., keep], ramp[..., keep], atol=1e-2)
    nearest, _ = baseline_volume("identity", lr, lr_affine, factors=(2, 2, 4), hr_shape=hr.shape)
    assert nearest[1, 3, 6] == lr[0, 1, 1]


def _write_case(folder: Path, affine: np.ndarray, *, offset: float = 0.0, name: str = "case"):
    from revgan_med.data.degradation import thick_slice
    from revgan_med.io import save_volume

    hr = _smooth_volume()
    lr, lr_affine = thick_slice(hr, affine, (2, 2, 4))
    paths = {k: folder / k / f"{name}.nii.gz" for k in ("pred", "ref", "lr")}
    save_volume(hr + offset, affine, paths["pred"])
    save_volume(hr, affine, paths["ref"])
    save_volume(lr, lr_affine, paths["lr"])
    return paths


def test_evaluate_volumes_files_csv_and_figure(tmp_path: Path, oblique_affine: np.ndarray) -> None:
    from revgan_med.evaluation import BASELINES, evaluate_volumes

    p = _write_case(tmp_path, oblique_affine, offset=15.0)
    report = evaluate_volumes(
        p["pred"], p["ref"], input=p["lr"], window="-1000,200", baselines=BASELINES,
        output=tmp_path / "m.csv", figure=tmp_path / "fig.png",
    )  # fmt: skip
    by = {r["method"]: r for r in report.rows}
    assert by["prediction"]["mae"] < 15.0 + 1e-3  # 15 HU everywhere, less where clipped by the window
    assert (
        by["tricubic"]["psnr"] > by["identity"]["psnr"] and by["trilinear"]["psnr"] > by["identity"]["psnr"]
    )
    csv = (tmp_path / "m.csv").read_text().splitlines()
    assert csv[0].startswith("case,method,mae,rmse,psnr,ssim") and len(csv) == 1 + 4 + 8
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_window_clipping_hides_differences_outside_it(tmp_path: Path) -> None:
    from revgan_med.evaluation import evaluate_volumes
    from revgan_med.io import save_volume

    ref = np.full((12, 12, 12), -500.0, np.float32)
    ref[:6] = 1000.0
    pred = ref.copy()
    pred[:6] = 3000.0  # differs only above the window
    save_volume(ref, np.eye(4), tmp_path / "r.nii.gz")
    save_volume(pred, np.eye(4), tmp_path / "p.nii.gz")
    (row,) = evaluate_volumes(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz", window="chest-1024").rows
    assert row["mae"] == 0.0 and row["psnr"] == float("inf")


def test_masked_rmse_total_and_interior(tmp_path: Path, rng: np.random.Generator) -> None:
    from revgan_med.evaluation import evaluate_volumes
    from revgan_med.io import save_volume

    ref = rng.normal(size=(20, 20, 20, 6)).astype(np.float32)
    mask = np.zeros((20, 20, 20), np.float32)
    mask[2:18, 2:18, 2:18] = 1
    pred = ref.copy()
    pred[2, 2:18, 2:18] += 2.0  # error on one face of the mask only: gone after a 5³ erosion
    for name, vol in (("r", ref), ("p", pred), ("m", mask)):
        save_volume(vol, np.eye(4), tmp_path / f"{name}.nii.gz")
    (row,) = evaluate_volumes(
        tmp_path / "p.nii.gz", tmp_path / "r.nii.gz", mask=tmp_path / "m.nii.gz", window=None
    ).rows
    assert row["rmse"] == pytest.approx(np.sqrt(4.0 * 16 * 16 / 16**3))
    assert row["rmse_interior"] == 0.0


def test_evaluate_cli_exit_codes(tmp_path: Path, oblique_affine: np.ndarray) -> None:
    from revgan_med.cli import main

    p = _write_case(tmp_path, oblique_affine, offset=5.0, name="a")
    _write_case(tmp_path, oblique_affine, offset=5.0, name="b")
    (tmp_path / "pred" / "b.nii.gz").rename(
        tmp_path / "pred" / "c.nii.gz"
    )  # c has no reference, b no prediction
    args = ["evaluate", "--prediction", str(p["pred"]), "--reference", str(p["ref"])]
    assert main([*args, "--output", str(tmp_path / "one.csv")]) == 0
    assert main([*args, "--baseline", "tricubic"]) == 2  # baselines need --input
    assert (
        main(["evaluate", "--prediction", str(tmp_path / "nope.nii.gz"), "--reference", str(p["ref"])]) == 1
    )
    folders = ["evaluate", "--prediction", str(tmp_path / "pred"), "--reference", str(tmp_path / "ref")]
    assert (
        main(
            [
                *folders,
                "--input",
                str(tmp_path / "lr"),
                "--baseline",
                "trilinear",
                "--output",
                str(tmp_path / "f.csv"),
            ]
        )
        == 1
    )
    rows = (tmp_path / "f.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:3]] == [["a", "prediction"], ["a", "trilinear"]]


def test_evaluate_folders_shows_progress(tmp_path: Path, capsys) -> None:
    from revgan_med.cli import main
    from revgan_med.io import save_volume

    for folder, offset in (("pred", 5.0), ("ref", 0.0)):
        for case in ("a", "b", "c"):
            volume = np.full((8, 8, 8), offset, np.float32)
            save_volume(volume, np.eye(4), tmp_path / folder / f"{case}.nii.gz")
    argv = ["evaluate", "--prediction", str(tmp_path / "pred"), "--reference", str(tmp_path / "ref")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "3/3" in captured.err and "evaluate" in captured.err  # tqdm's bar over the cases
