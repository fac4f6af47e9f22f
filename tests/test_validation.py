"""Validation beside the classical baseline: scores, margin, best.pt, the end-of-run report and the
automatic hold-out of a single training case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_data import tiny_config, write_kernel_datalist, write_sr_datalist

from revgan_med.checkpoints import build_generator_from_config, load_checkpoint
from revgan_med.cli import main
from revgan_med.data.degradation import upsample_to_hr
from revgan_med.data.sampling import ct_body
from revgan_med.data.transforms import CTWindow
from revgan_med.io import load_volume
from revgan_med.tasks import WINDOWS
from revgan_med.training.holdout import _holdout_axis, holdout_config
from revgan_med.training.loop import train
from revgan_med.training.validation import ValidationSet, fallbacks, margin_report


def _psnr(prediction: np.ndarray, reference: np.ndarray, window: tuple[float, float], mask=None) -> float:
    lo, hi = window
    error = np.clip(prediction, lo, hi) - np.clip(reference, lo, hi)
    mse = np.mean((error if mask is None else error[mask]).astype(np.float64) ** 2)
    return float(10 * np.log10((hi - lo) ** 2 / mse))


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("region", ["all", "body"])
def test_kernel_baseline_is_the_linear_filter_scored_in_the_nlst_window(tmp_path, region):
    """And only inside the target's body when training there (``loss.region: body``)."""
    datalist = write_kernel_datalist(tmp_path, cases=2)
    config = tiny_config(
        datalist, "data.window=ct-full", "model.residual=true", "model.linear_kernel=[3,3,1]",
        f"loss.region={region}",
    )
    generator = build_generator_from_config(config)
    with torch.no_grad():  # a hand-set solution: output = input + 0.5·input + 10 HU (in ct-full units)
        generator.lin_y.solved_weight[0, 0, 1, 1, 0] = 0.5
        generator.lin_y.solved_bias.fill_(20.0 / 4095.0)
        generator.lin_y.weight.fill_(0.3)  # trained since: the baseline stays the solution
    validation = ValidationSet.from_config(config, CTWindow(*WINDOWS["ct-full"]))
    assert validation.baseline == "fitted linear filter"
    smooth, sharp = (load_volume(tmp_path / "case1" / f"{n}.nii.gz")[0] for n in ("smooth", "sharp"))
    # +0.5 in normalised units is x + 0.5 · (x − window centre) in HU; the bias adds 20 / 4095 · 4095 / 2
    filtered = 1.5 * np.clip(smooth, -1024, 3071) - 0.25 * (-1024 + 3071) + 10.0
    body = ct_body(sharp) if region == "body" else None
    assert body is None or 0.05 < body.mean() < 0.95
    expected = _psnr(filtered, sharp, WINDOWS["nlst"], body)
    metrics = validation.evaluate(generator, device=torch.device("cpu"))
    assert metrics["baseline_psnr"] == pytest.approx(expected, abs=1e-3)
    # sharp → smooth is validated too; its path is still zero, so its baseline is the sharp input itself
    inverse = _psnr(sharp, smooth, WINDOWS["nlst"], body)
    assert metrics["inverse_baseline_psnr"] == pytest.approx(inverse, abs=1e-3)
    margins = [metrics[f"{p}psnr"] - metrics[f"{p}baseline_psnr"] for p in ("", "inverse_")]
    assert margins[0] < 0 and metrics["fallback"] == 1.0  # the trained 0.3 is worse than the solved 0.5
    assert metrics["psnr_margin"] == pytest.approx(sum(max(m, 0.0) for m in margins) / 2)  # it falls back


def test_kernel_baseline_sees_the_border_as_the_model_windows_do(tmp_path):
    """A second difference across x as the fitted path: at the volume's first and last x it is computed
    on NumPy's odd reflection of the volume (clipped to its range), the border `infer` gives a kernel
    model's windows (`BORDER_PADDING`), not on the path's own repeated border."""
    from scipy import ndimage

    datalist = write_kernel_datalist(tmp_path, cases=2)
    config = tiny_config(
        datalist, "data.window=ct-full", "model.residual=true", "model.linear_kernel=[3,3,1]"
    )
    generator = build_generator_from_config(config)
    weight = np.zeros((3, 3, 1), np.float32)
    weight[:, 1, 0] = (-0.5, 1.0, -0.5)
    with torch.no_grad():
        generator.lin_y.solved_weight[0, 0] = torch.from_numpy(weight)
    window = CTWindow(*WINDOWS["ct-full"])
    validation = ValidationSet.from_config(config, window)
    smooth, sharp = (load_volume(tmp_path / "case1" / f"{n}.nii.gz")[0] for n in ("smooth", "sharp"))
    x = window.normalize(smooth)
    odd = np.clip(np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="reflect", reflect_type="odd"), x.min(), x.max())
    expected = window.denormalize(x + ndimage.correlate(odd, weight)[1:-1, 1:-1])
    score = validation.score_baseline(generator)["baseline_psnr"]
    assert score == pytest.approx(_psnr(expected, sharp, WINDOWS["nlst"]), abs=1e-3)
    repeated = window.denormalize(x + ndimage.correlate(x, weight, mode="nearest"))
    assert abs(_psnr(repeated, sharp, WINDOWS["nlst"]) - score) > 0.01  # the border matters here


def test_untrained_residual_generator_with_fitted_paths_has_zero_margin(tmp_path):
    datalist = write_kernel_datalist(tmp_path, cases=2)
    config = tiny_config(datalist, "model.residual=true", "model.linear_kernel=[3,3,1]")
    generator = build_generator_from_config(config)
    with torch.no_grad():  # as `LinearPath.solve` leaves them: trained weights = the solution
        generator.lin_y.weight.normal_(0.0, 0.1)
        generator.lin_y.solved_weight.copy_(generator.lin_y.weight)
    metrics = ValidationSet.from_config(config, CTWindow(*WINDOWS["nlst"])).evaluate(
        generator, device=torch.device("cpu")
    )
    assert metrics["psnr_margin"] == pytest.approx(0.0, abs=1e-4)


def test_a_direction_below_its_baseline_falls_back_to_it_exactly(tmp_path):
    datalist = write_kernel_datalist(tmp_path, cases=2)
    overrides = ("data.window=ct-full", "model.residual=true", "model.linear_kernel=[3,3,1]")
    config = tiny_config(datalist, *overrides)
    generator = build_generator_from_config(config)
    with torch.no_grad():  # solved filters, trained on since, and the random correction at full strength
        for path, centre in ((generator.lin_y, 0.05), (generator.lin_x, -0.05)):
            path.solved_weight[0, 0, 1, 1, 0] = centre
            path.weight[0, 0, 1, 1, 0] = 2 * centre
        generator.gate.fill_(1.0)
    validation = ValidationSet.from_config(config, CTWindow(*WINDOWS["ct-full"]))
    metrics = validation.evaluate(generator, device=torch.device("cpu"))
    for prefix in ("", "inverse_"):
        assert metrics[f"{prefix}psnr"] < metrics[f"{prefix}baseline_psnr"] - 1.0  # the correction is noise
        assert metrics[f"{prefix}fallback"] == 1.0
    assert metrics["psnr_margin"] == 0.0  # each direction counts as its baseline
    generator.baseline_only.copy_(fallbacks(metrics))
    switched = validation.evaluate(generator, device=torch.device("cpu"))
    for prefix in ("", "inverse_"):
        assert switched[f"{prefix}psnr"] == pytest.approx(switched[f"{prefix}baseline_psnr"], abs=1e-4)


def test_sr_baseline_is_tricubic_whatever_the_input_upsampling(tmp_path):
    datalist = write_sr_datalist(tmp_path)
    (item,) = json.loads(datalist.read_text())["training"]
    data = json.loads(datalist.read_text())
    datalist.write_text(json.dumps({"training": [item], "validation": data["training"]}))
    hr = load_volume(tmp_path / "case" / "hr.nii.gz")[0]
    lr, lr_affine = load_volume(tmp_path / "case" / "lr.nii.gz")
    tricubic = upsample_to_hr(lr, lr_affine, (2, 2, 4), mode="tricubic", hr_shape=hr.shape)[0]
    config = tiny_config(datalist, "task=ct-sr", "data.window=chest-1024", "data.upsample=nearest",
                         "model.generator=rev_srcnn3d")  # fmt: skip
    validation = ValidationSet.from_config(config, CTWindow(*WINDOWS["chest-1024"]))
    assert validation.baseline == "tricubic"
    baseline = validation.score_baseline(build_generator_from_config(config))
    assert baseline["baseline_psnr"] == pytest.approx(_psnr(tricubic, hr, WINDOWS["chest-1024"]), abs=1e-3)


def test_single_kernel_case_is_split_and_validated_on_its_held_out_end(tmp_path):
    datalist = write_kernel_datalist(tmp_path / "data", cases=1, shape=(20, 24, 30), validation=False)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="validating on its last 6 of 30 voxels along axis 2"):
        overrides = ("loss.gan=none", "model.linear_kernel=[3,3,1]", "train.linear_fit_batches=2")
        train(tiny_config(datalist, *overrides), run)
    smooth, affine = load_volume(tmp_path / "data" / "case0" / "smooth.nii.gz")
    train_part, train_affine = load_volume(run / "holdout" / "training" / "image.nii.gz")
    held, held_affine = load_volume(run / "holdout" / "validation" / "image.nii.gz")
    np.testing.assert_array_equal(np.concatenate([train_part, held], axis=2), smooth)
    np.testing.assert_allclose(train_affine, affine)
    np.testing.assert_allclose(held_affine[:3, 3], affine[:3, 3] + 24 * affine[:3, 2])
    rows = _rows(run)
    assert {"val_psnr", "val_baseline_psnr", "val_psnr_margin"} <= set(rows[0])
    margins = [float(r["val_psnr_margin"]) for r in rows if r["val_psnr_margin"]]
    assert len(margins) == 3 and rows[0]["step"] == "0"  # before training, after 3 and after 6 steps
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best_metric"] == {"name": "psnr_margin", "value": pytest.approx(max(margins), abs=1e-5)}


@pytest.mark.parametrize(
    ("shape", "held"),
    [((40, 24, 10), "last 2 of 10 voxels along axis 2"), ((40, 24, 4), "last 8 of 40 voxels along axis 0")],
)
def test_a_single_case_is_cut_along_its_slice_axis_when_it_has_five_slices(tmp_path, shape, held):
    """Whole cross-sections are held out (z: 2 mm voxels against 1.5 mm in-plane), not an in-plane strip
    at the field of view's edge; with fewer than five slices, the longest axis."""
    datalist = write_kernel_datalist(tmp_path / "data", cases=1, shape=shape, validation=False)
    with pytest.warns(UserWarning, match=held):
        holdout_config(tiny_config(datalist), tmp_path / "run")


def test_the_slice_axis_is_the_last_of_equally_thick_ones():
    assert _holdout_axis((30, 40, 12), np.eye(4), (1, 1, 1)) == 2  # isotropic: z, though y is longer
    assert _holdout_axis((30, 40, 12), np.diag([1.0, 2.0, 1.0, 1.0]), (1, 1, 1)) == 1
    assert _holdout_axis((24, 24, 40), np.eye(4), (2, 2, 4)) == 2  # the input's thick slices count


def test_best_checkpoint_keeps_its_baseline_in_each_direction_the_model_was_below_it(tmp_path):
    """A run that gets worse (lr 0.05) saves best.pt with those directions' corrections off: reloaded and
    validated again, best.pt is nowhere below the fitted filters; last.pt keeps every correction."""
    datalist = write_kernel_datalist(tmp_path / "data", cases=2)
    run = tmp_path / "run"
    overrides = ("loss.gan=none", "model.residual=true", "model.linear_kernel=[3,3,1]",
                 "train.linear_fit_batches=2", "train.lr=0.05", "train.val_every=2")  # fmt: skip
    config = tiny_config(datalist, *overrides)
    train(config, run)
    rows = [r for r in _rows(run) if r["val_psnr"]]
    best_row = max(rows, key=lambda r: float(r["val_psnr_margin"]))
    flags = [float(best_row[f"val_{p}fallback"]) > 0 for p in ("", "inverse_")]
    assert any(float(r[f"val_{p}fallback"]) > 0 for r in rows[1:] for p in ("", "inverse_"))
    validation = ValidationSet.from_config(config, CTWindow(*WINDOWS["nlst"]))
    for name, expected in (("last.pt", [False, False]), ("best.pt", flags)):
        generator = build_generator_from_config(config)
        generator.load_state_dict(load_checkpoint(run / "checkpoints" / name)["models"]["generator"])
        assert generator.baseline_only.tolist() == expected
    validation = ValidationSet.from_config(config, CTWindow(*WINDOWS["nlst"]))
    metrics = validation.evaluate(generator, device=torch.device("cpu"))  # best.pt, baselines from its paths
    for prefix, off in zip(("", "inverse_"), flags, strict=True):
        if off:
            assert metrics[f"{prefix}psnr"] == pytest.approx(metrics[f"{prefix}baseline_psnr"], abs=1e-4)
        else:
            assert metrics[f"{prefix}psnr"] >= metrics[f"{prefix}baseline_psnr"] - 1e-4


def test_single_sr_case_is_cut_on_a_whole_thick_slice(tmp_path):
    datalist = write_sr_datalist(tmp_path / "data")
    config = tiny_config(datalist, "task=ct-sr", "data.window=chest-1024", "model.generator=rev_srcnn3d")
    with pytest.warns(UserWarning, match="last 8 of 40 voxels along axis 2"):
        split = holdout_config(config, tmp_path / "run")
    listing = json.loads(Path(split.data.datalist).read_text())
    assert set(listing) == {"training", "validation"}
    folder = tmp_path / "run" / "holdout"
    (lr_train, lr_train_affine), (lr_val, lr_val_affine) = (
        load_volume(folder / s / "image.nii.gz") for s in ("training", "validation")
    )
    (hr_train, _), (hr_val, hr_val_affine) = (
        load_volume(folder / s / "target.nii.gz") for s in ("training", "validation")
    )
    assert (
        lr_train.shape[2] == 8 and lr_val.shape[2] == 2 and hr_train.shape[2] == 32 and hr_val.shape[2] == 8
    )
    # each part's thick slices still average its own HR voxels: the input/target geometry is intact
    lr, lr_affine = load_volume(tmp_path / "data" / "case" / "lr.nii.gz")
    np.testing.assert_array_equal(lr_val, lr[..., 8:])
    np.testing.assert_allclose(lr_val_affine[:3, 3], lr_affine[:3, 3] + 8 * lr_affine[:3, 2])
    np.testing.assert_allclose(
        hr_val_affine @ [0.5, 0.5, 1.5, 1.0], lr_val_affine[:, 3]
    )  # LR centre (f − 1) / 2
    assert holdout_config(split, tmp_path / "run") is split  # a validation case now: nothing to split


def test_train_command_ends_with_the_margin_of_each_direction(tmp_path, capsys):
    datalist = write_kernel_datalist(tmp_path, cases=2)
    config = tmp_path / "config.yaml"
    from revgan_med.config import save_config

    save_config(tiny_config(datalist, "loss.gan=none", "train.steps=2", "train.val_every=2"), config)
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    row = _rows(tmp_path / "run")[-1]
    margins = {p: float(row[f"val_{p}psnr"]) - float(row[f"val_{p}baseline_psnr"]) for p in ("", "inverse_")}
    assert float(row["val_psnr_margin"]) == pytest.approx(sum(margins.values()) / 2, abs=1e-4)
    text = "\n".join(out)
    for prefix, name in (("", "X → Y"), ("inverse_", "Y → X")):
        line = next(x for x in out if x.startswith(f"validation at step 2, {name}:"))
        assert "baseline (identity (the input))" in line and f"margin {margins[prefix]:+.2f} dB" in line
        assert (f"BELOW its baseline (identity (the input)) on the validation data ({name})" in text) == (
            margins[prefix] < -0.005
        )
    assert f"mean margin {float(row['val_psnr_margin']):+.2f} dB" in text


def test_margin_report_warns_when_the_model_ends_below_its_baseline(tmp_path):
    columns = "step,g_loss,val_psnr,val_ssim,val_baseline_psnr,val_baseline_ssim,val_psnr_margin\n"
    rows = [
        "1,0.5,,,,,",
        "2,0.4,30,0.9,31,0.91,-1",
        "4,0.3,32.5,0.95,31,0.91,1.5",
        "6,0.2,30.5,0.93,31,0.91,-0.5",
    ]
    (tmp_path / "metrics.csv").write_text(columns + "\n".join(rows) + "\n")
    first, warning = margin_report(tmp_path, "tricubic")
    assert "step 6" in first and "30.50 dB" in first and "margin -0.50 dB" in first
    assert "best.pt: step 4, margin +1.50 dB" in first
    assert warning.startswith("WARNING") and "0.50 dB BELOW its baseline (tricubic)" in warning
    (tmp_path / "metrics.csv").write_text(columns + "2,0.4,32,0.9,31,0.91,1\n")
    assert len(margin_report(tmp_path, "tricubic")) == 1
    assert margin_report(tmp_path / "nothing", "tricubic") == []


def test_margin_report_of_a_kernel_model_gives_each_direction_and_warns_for_the_one_below(tmp_path):
    columns = "step,val_psnr,val_ssim,val_baseline_psnr,val_baseline_ssim,val_inverse_psnr,val_inverse_ssim,"
    columns += "val_inverse_baseline_psnr,val_inverse_baseline_ssim,val_psnr_margin\n"
    rows = ["0,40,0.9,40,0.9,42,0.95,42,0.95,0", "5,39.8,0.9,40,0.9,44,0.96,42,0.95,0.9"]
    (tmp_path / "metrics.csv").write_text(columns + "\n".join(rows) + "\n")
    forward, inverse, mean, warning = margin_report(tmp_path, "fitted linear filter")
    assert forward.startswith("validation at step 5, X → Y: model PSNR 39.80 dB")
    assert inverse.startswith("validation at step 5, Y → X: model PSNR 44.00 dB")
    assert "margin -0.20 dB" in forward and "margin +2.00 dB" in inverse
    assert mean == "mean margin +0.90 dB; best.pt: step 5, mean margin +0.90 dB (X → Y -0.20, Y → X +2.00)"
    assert warning == ("WARNING: the model ends 0.20 dB BELOW its baseline (fitted linear filter) on the "
                       "validation data (X → Y)")  # fmt: skip
