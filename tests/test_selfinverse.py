"""Self-inverse ("one2one") objective, its one-function generator, and the §6 sensitivity analysis."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _training_data import tiny_config, write_kernel_datalist

from revgan_med.checkpoints import generator_from_checkpoint, load_checkpoint
from revgan_med.config import load_config
from revgan_med.networks import build_generator, init_weights
from revgan_med.networks.selfinverse import SelfInverseGenerator
from revgan_med.sensitivity import gaussian_perturbation, output_sensitivity, sensitivity_analysis
from revgan_med.training.distributed import init_distributed
from revgan_med.training.loop import build_training_objective, train, train_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _generator(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    generator = build_generator(name, in_channels=1, out_channels=1, width=4, depth=2)
    init_weights(generator, zero_last=False)  # non-trivial blocks
    return generator


@pytest.mark.parametrize("name", ["srcnn3d", "resnet3d"])
def test_plain_self_inverse_generator_has_half_the_parameters(name: str) -> None:
    paired = _generator(name)
    total = _count(paired)
    single = SelfInverseGenerator.from_generator(paired)
    assert 2 * _count(single) == total


@pytest.mark.parametrize("name", ["rev_srcnn3d", "rev_resnet3d"])
def test_reversible_self_inverse_generator_drops_the_second_encoder_decoder(name: str) -> None:
    paired = _generator(name)
    expected = _count(paired) - _count(paired.enc_y) - _count(paired.dec_x)
    assert _count(SelfInverseGenerator.from_generator(paired)) == expected


@pytest.mark.parametrize("name", ["srcnn3d", "rev_resnet3d"])
def test_self_inverse_generator_is_one_function(name: str) -> None:
    generator = SelfInverseGenerator.from_generator(_generator(name))
    v = torch.randn(1, 1, 12, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(generator.inverse(v), generator(v))
        # the one function is the X→Y network of the original generator
        expected = generator.dec_y(generator.core(generator.enc_x(v)))
        torch.testing.assert_close(generator(v), expected)


def test_one_step_alternates_directions_and_shares_one_discriminator(tmp_path) -> None:
    config = tiny_config(write_kernel_datalist(tmp_path), "objective=self-inverse")
    torch.manual_seed(0)
    objective = build_training_objective(config)
    assert sorted(objective.discriminators) == ["disc"]
    modules = objective.modules_by_role()
    optimizers = {r: torch.optim.Adam(m.parameters(), lr=1e-3) for r, m in modules.items()}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    context = init_distributed("cpu")
    x, y = torch.rand(1, 1, 24, 24, 24) * 2 - 1, torch.rand(1, 1, 24, 24, 24) * 2 - 1
    batch = {"image": x, "target": y}
    kwargs = {"optimizers": optimizers, "scaler": scaler, "amp_dtype": None, "context": context}
    with torch.no_grad():
        expected_xy = 100.0 * F.l1_loss(objective.generator(x), y).item()
    first = train_step(objective, batch, **kwargs)
    with torch.no_grad():
        expected_yx = 100.0 * F.l1_loss(objective.generator(y), x).item()
    second = train_step(objective, batch, **kwargs)
    assert "l1_xy" in first and "l1_yx" not in first
    assert "l1_yx" in second and "l1_xy" not in second
    assert first["l1_xy"] == pytest.approx(expected_xy, rel=1e-5)
    assert second["l1_yx"] == pytest.approx(expected_yx, rel=1e-5)
    assert all(math.isfinite(v) for v in (*first.values(), *second.values()))
    assert objective.extra_state() == {"steps_done": 2}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet3d", "rev_resnet3d"])
def test_trained_checkpoint_ignores_direction(tmp_path, name: str) -> None:
    config = tiny_config(write_kernel_datalist(tmp_path), "objective=self-inverse", f"model.generator={name}",
                         "train.steps=2", "train.val_every=2", "train.checkpoint_every=2")  # fmt: skip
    last = train(config, tmp_path / "run")
    payload = load_checkpoint(last)
    generator, loaded = generator_from_checkpoint(payload)
    assert loaded.objective == "self-inverse"
    plain = build_generator(name, in_channels=1, out_channels=1, width=4, depth=2)
    assert _count(generator) * (2 if name == "resnet3d" else 1) <= _count(plain)
    v = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(generator.inverse(v), generator(v))
        # the weights are the trained ones: rebuild the one function by hand from the state dict
        plain.load_state_dict(payload["models"]["generator"])
        plain.eval()
        torch.testing.assert_close(generator(v), plain(v))


def test_checkpoint_keeps_both_linear_paths_and_the_fitted_domain_gate(tmp_path) -> None:
    config = tiny_config(write_kernel_datalist(tmp_path), "objective=self-inverse", "model.residual=true",
                         "model.linear_kernel=[5,5,1]", "train.linear_fit_batches=2", "train.steps=1",
                         "train.val_every=1", "train.checkpoint_every=1")  # fmt: skip
    payload = load_checkpoint(train(config, tmp_path / "run"))
    generator, _ = generator_from_checkpoint(payload)
    saved = payload["models"]["generator"]
    assert generator.lin_x is not generator.lin_y
    assert torch.count_nonzero(saved["domain.weight"]) == 4  # fitted at the start, not the zero init
    torch.testing.assert_close(generator.domain.weight, saved["domain.weight"])
    torch.testing.assert_close(generator.lin_x.weight, saved["lin_x.weight"])
    v = torch.rand(2, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(generator.inverse(v), generator(v))


def test_self_inverse_config_is_valid() -> None:
    config = load_config(CONFIGS / "ct_kernel_selfinverse.yaml")
    assert config.objective == "self-inverse" and config.task == "ct-kernel"


# --- §6 model sensitivity -------------------------------------------------------------------------


def test_sensitivity_of_identity_is_the_metric_change_of_the_input() -> None:
    rng = np.random.default_rng(0)
    reference = rng.uniform(0, 100, size=(12, 12, 12))
    source = reference + 1.0
    perturbed = reference + 3.0
    result = output_sensitivity(lambda v: v, source=source, perturbed=perturbed, reference=reference,
                                data_range=100.0)  # fmt: skip
    # errors are constant 1 and 3: PSNR = 20 log10(100 / e), MAE = e
    assert result["psnr"] == pytest.approx(40.0)
    assert result["d_psnr"] == pytest.approx(20 * np.log10(3.0))
    assert result["d_mae"] == pytest.approx(2.0)
    assert result["input_change"] == pytest.approx(2.0)
    assert result["output_change"] == pytest.approx(2.0)


def test_sensitivity_of_a_constant_model_is_zero_and_of_a_gain_scales() -> None:
    rng = np.random.default_rng(1)
    source = rng.uniform(0, 1, size=(10, 10, 10))
    perturbed = gaussian_perturbation(source, std=0.05, seed=3)
    flat = output_sensitivity(lambda v: np.full_like(v, 0.5), source=source, perturbed=perturbed,
                              reference=source, data_range=1.0)  # fmt: skip
    assert flat["output_change"] == 0.0 and flat["d_psnr"] == 0.0 and flat["d_ssim"] == 0.0
    rows = sensitivity_analysis(forward=lambda v: 2 * v, inverse=lambda v: v / 2, source=source,
                                target=2 * source, perturbed_source=perturbed,
                                perturbed_target=2 * perturbed, data_range=2.0)  # fmt: skip
    assert [r["direction"] for r in rows] == ["forward", "inverse"]
    assert rows[0]["output_change"] == pytest.approx(2 * rows[0]["input_change"])
    assert rows[1]["output_change"] == pytest.approx(rows[1]["input_change"] / 2)
    assert rows[0]["psnr"] == math.inf  # forward(source) is exactly the target


def test_sensitivity_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        output_sensitivity(lambda v: v, source=np.zeros((4, 4, 4)), perturbed=np.zeros((4, 4, 5)),
                           reference=np.zeros((4, 4, 4)), data_range=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="positive"):
        gaussian_perturbation(np.zeros(3), std=0.0)


@pytest.mark.slow
def test_evaluate_sensitivity_cli_on_a_trained_checkpoint(tmp_path, capsys) -> None:
    from revgan_med.cli import main
    from revgan_med.io import load_volume, save_volume

    config = tiny_config(write_kernel_datalist(tmp_path), "objective=self-inverse", "model.generator=srcnn3d",
                         "train.steps=2", "train.val_every=2", "train.checkpoint_every=2")  # fmt: skip
    last = train(config, tmp_path / "run")
    source, reference = tmp_path / "case2" / "smooth.nii.gz", tmp_path / "case2" / "sharp.nii.gz"
    array, affine = load_volume(source)
    perturbed = tmp_path / "perturbed.nii.gz"
    save_volume(gaussian_perturbation(array, std=40.0, seed=0).astype(np.float32), affine, perturbed)
    common = ["evaluate", "--sensitivity", str(last), "--input", str(source), "--reference", str(reference)]
    assert main([*common, "--prediction", str(source), "--direction", "inverse"]) == 0
    header, values = capsys.readouterr().out.strip().splitlines()[-2:]
    row = dict(zip(header.split(" | "), values.split(" | "), strict=True))
    # the input itself as "perturbation": nothing changes
    assert row["direction"] == "inverse"
    assert float(row["d_psnr"]) == 0.0 and float(row["output_change"]) == 0.0
    assert main([*common, "--prediction", str(perturbed)]) == 0
    header, values = capsys.readouterr().out.strip().splitlines()[-2:]
    row = dict(zip(header.split(" | "), values.split(" | "), strict=True))
    assert float(row["input_change"]) > 0 and float(row["output_change"]) > 0
    assert main([*common, "--prediction", str(tmp_path / "missing.nii.gz")]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("residual", [True, False])
def test_benchmark_residual_generators_start_as_the_identity(tmp_path, residual: bool) -> None:
    """With lr 0 the models stay untrained: residual generators return their input in both directions."""
    import json

    from scipy.ndimage import gaussian_filter
    from selfinverse import main

    from revgan_med.io.dicom_writer import save_dicom_series

    rng = np.random.default_rng(0)
    smooth = -400.0 + 3000.0 * gaussian_filter(rng.standard_normal((48, 80, 8)), 2.0)
    sharp = smooth + 40.0 * rng.standard_normal(smooth.shape)
    for kernel, hu in (("B", smooth), ("L", sharp)):
        save_dicom_series(np.round(hu), np.eye(4), tmp_path / "pair" / kernel, series_description=kernel)
    out = tmp_path / "selfinverse.json"
    flag = "--residual" if residual else "--no-residual"
    args = ["--pair", str(tmp_path / "pair"), "--steps", "2", "--width", "4",
            "--lr", "0", "--linear-kernel", "none", "--device", "cpu", flag, "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    base, *models = result["rows"]
    assert result["residual"] is residual and [m["objective"] for m in models] == ["paired", "self-inverse"]
    assert models[1]["parameters"] * 2 == models[0]["parameters"]
    for model in models:
        for key in ("psnr_forward", "psnr_inverse"):
            assert (abs(model[key] - base[key]) < 1e-3) is residual
