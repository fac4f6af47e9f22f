"""RegGAN objectives (reggan, reggan-cycle) and the misalignment augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _training_data import tiny_config, write_kernel_datalist

from revgan_med.checkpoints import load_checkpoint
from revgan_med.config import load_config
from revgan_med.data.misalign import misalign_pair, misalignment_ranges
from revgan_med.training.distributed import init_distributed
from revgan_med.training.loop import build_training_objective, train, train_step


def _step(objective, batch):
    modules = objective.modules_by_role()
    optimizers = {r: torch.optim.Adam(m.parameters(), lr=1e-3) for r, m in modules.items()}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_step(objective, batch, optimizers=optimizers, scaler=scaler, amp_dtype=None,
                      context=init_distributed("cpu"))  # fmt: skip


@pytest.mark.parametrize("name", ["reggan", "reggan-cycle"])
def test_one_step_is_finite_and_trains_generator_and_registration(tmp_path, name: str) -> None:
    config = tiny_config(write_kernel_datalist(tmp_path), f"objective={name}", "loss.registration_width=4",
                         "loss.registration_levels=2")  # fmt: skip
    torch.manual_seed(0)
    objective = build_training_objective(config)
    assert objective.generator_roles() == ["generator", "registration"]
    assert sorted(objective.discriminators) == (["disc_y"] if name == "reggan" else ["disc_x", "disc_y"])
    x = torch.rand(1, 1, 24, 24, 24) * 2 - 1
    y = torch.roll(x, 2, dims=2)  # a misaligned pair
    with torch.no_grad():  # R starts at T = 0: Corr is the plain L1 of the output, Smooth is 0
        expected_corr = 20.0 * F.l1_loss(objective.generator(x), y).item()
    before = [p.detach().clone() for p in objective.registration.parameters()]
    losses = _step(objective, {"image": x, "target": y})
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["corr"] == pytest.approx(expected_corr, rel=1e-5)
    assert losses["smooth"] == 0.0
    assert "d_y" in losses
    after = list(objective.registration.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_reggan_without_gan_has_no_discriminator(tmp_path) -> None:
    config = tiny_config(write_kernel_datalist(tmp_path), "objective=reggan", "loss.gan=none",
                         "loss.registration_width=4", "loss.registration_levels=1")  # fmt: skip
    objective = build_training_objective(config)
    assert not objective.discriminators
    losses = _step(objective, {"image": torch.rand(1, 1, 24, 24, 24), "target": torch.rand(1, 1, 24, 24, 24)})
    assert set(losses) == {"g_loss", "corr", "smooth"}


def test_reggan_cycle_needs_a_gan(tmp_path) -> None:
    config = tiny_config(write_kernel_datalist(tmp_path), "objective=reggan-cycle", "loss.gan=none")
    with pytest.raises(ValueError, match="needs a GAN loss"):
        build_training_objective(config)


@pytest.mark.slow
def test_reggan_run_checkpoints_the_registration_network(tmp_path) -> None:
    config = tiny_config(write_kernel_datalist(tmp_path), "objective=reggan", "loss.registration_width=4",
                         "loss.registration_levels=2", "train.steps=2", "train.val_every=2",
                         "train.checkpoint_every=2")  # fmt: skip
    payload = load_checkpoint(train(config, tmp_path / "run"))
    assert set(payload["models"]) == {"generator", "registration", "disc_y"}
    assert payload["step"] == 2


def test_reggan_config_is_valid() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "ct_sr_reggan.yaml")
    assert config.objective == "reggan"
    assert (config.loss.lambda_corr, config.loss.lambda_smooth, config.loss.lambda_adv) == (20.0, 10.0, 1.0)


# --- misalignment augmentation --------------------------------------------------------------------


def _blob(size: int, centre: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")).astype(np.float64)
    return np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * 2.0**2))[None]


def _centroid(volume: torch.Tensor) -> np.ndarray:
    v = np.asarray(volume[0], dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in v.shape], indexing="ij"))
    return (grid * v).sum((1, 2, 3)) / v.sum()


def test_noise_level_zero_keeps_the_pair() -> None:
    image = np.random.default_rng(0).random((1, 10, 11, 12)).astype(np.float32)
    source, target, a_source, a_target = misalign_pair(image, image, noise_level=0, seed=3)
    np.testing.assert_allclose(source.numpy(), image, atol=1e-6)
    np.testing.assert_allclose(target.numpy(), image, atol=1e-6)
    np.testing.assert_array_equal(a_source, np.eye(4))
    np.testing.assert_array_equal(a_target, np.eye(4))


def test_misalignment_is_independent_known_and_within_the_level() -> None:
    centre = np.array([11.0, 12.0, 12.5])
    blob = _blob(24, centre)
    level = 5
    source, target, a_source, a_target = misalign_pair(
        blob, blob, noise_level=level, seed=1, padding_mode="zeros"
    )
    assert not np.allclose(a_source, a_target)  # independent transforms of source and target
    for image, affine in ((source, a_source), (target, a_target)):
        # the returned affine maps output voxels to input voxels: the blob's centre moves accordingly
        mapped = affine @ np.r_[_centroid(image), 1.0]
        np.testing.assert_allclose(mapped[:3], centre, atol=0.1)
        linear = affine[:3, :3]
        singular = np.linalg.svd(linear, compute_uv=False)
        # scale within 1 ± 0.02·level per axis, rotation ≤ level degrees about each axis
        assert singular.max() <= 1 + 0.02 * level + 0.01 and singular.min() >= 1 - 0.02 * level - 0.01
        # the volume centre moves by the (scaled, rotated) translation, at most 0.02·level·24 per axis
        middle = np.r_[[11.5] * 3, 1.0]
        shift = np.linalg.norm((affine @ middle)[:3] - middle[:3])
        assert shift <= singular.max() * np.sqrt(3) * 0.02 * level * 24 + 1e-6
    again = misalign_pair(blob, blob, noise_level=level, seed=1, padding_mode="zeros")
    np.testing.assert_array_equal(again[2], a_source)


def test_misalignment_ranges_follow_reggan() -> None:
    ranges = misalignment_ranges(3, (100, 50, 20))
    assert ranges["rotate_range"] == pytest.approx([math.radians(3)] * 3)
    assert ranges["translate_range"] == pytest.approx([6.0, 3.0, 1.2])
    assert ranges["scale_range"] == pytest.approx([0.06] * 3)
    with pytest.raises(ValueError, match="noise_level"):
        misalignment_ranges(-1, (8, 8, 8))
    with pytest.raises(ValueError, match="equal"):
        misalign_pair(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 5)), noise_level=1, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("residual", "objectives", "task"), [(True, "paired,reggan", "kernel"), (False, "paired", "sr")]
)
def test_benchmark_residual_generators_start_as_the_identity(
    tmp_path, residual: bool, objectives: str, task: str
) -> None:
    """With lr 0 the models stay untrained: a residual generator returns its input, a plain one does not."""
    import json

    from reggan import main
    from scipy.ndimage import gaussian_filter

    from revgan_med.io import save_volume

    rng = np.random.default_rng(0)
    hu = -500.0 + 3000.0 * gaussian_filter(rng.standard_normal((40, 40, 64)), 2.0)
    scan = save_volume(hu.astype(np.float32), np.eye(4), tmp_path / "scan.nii.gz")
    out = tmp_path / "reggan.json"
    flag = "--residual" if residual else "--no-residual"
    args = ["--scan", str(scan), "--levels", "2", "--steps", "2", "--patch", "24",
            "--width", "4", "--lr", "0", "--objectives", objectives, "--task", task, "--device", "cpu", flag,
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    base = next(r["psnr"] for r in result["rows"] if r["level"] is None)
    models = [r["psnr"] for r in result["rows"] if r["level"] is not None]
    assert result["residual"] is residual and len(models) == len(objectives.split(","))
    for psnr in models:
        assert (abs(psnr - base) < 1e-3) is residual
