from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _training_data import tiny_config, write_kernel_datalist

from revgan_med.checkpoints import (
    build_generator_from_config,
    checkpoint_config,
    generator_from_checkpoint,
    load_checkpoint,
)
from revgan_med.cli import main
from revgan_med.config import save_config
from revgan_med.inference import load_model
from revgan_med.training.loop import lr_factor, train


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    return write_kernel_datalist(tmp_path_factory.mktemp("kernel"))


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _normalised_biases(config) -> set[str]:
    """Biases of convolutions followed by InstanceNorm: the norm removes them, so their gradient is 0 up to
    rounding, and Adam turns any rounding difference (thread scheduling, another process) into a step of
    ±lr. They cannot change any output, so they are left out of the comparison."""
    generator = build_generator_from_config(config)
    keys = set()
    for name, module in generator.named_modules():
        if isinstance(module, torch.nn.Sequential):
            for i, (layer, following) in enumerate(zip(module, list(module)[1:], strict=False)):
                normalised = isinstance(following, torch.nn.InstanceNorm3d)
                if normalised and getattr(layer, "bias", None) is not None:
                    keys.add(f"{name}.{i}.bias")
    return keys


def _assert_same_state(a: dict, b: dict, atol: float = 1e-6, moments_rtol: float = 1e-6) -> None:
    """Same weights (within `atol`) and the same Adam moments (within `moments_rtol` of each tensor's norm:
    the moments are gradient-sized, 1e-8 to 30 here, so one absolute tolerance cannot fit them all)."""
    config = checkpoint_config(a)
    skip = {f"generator.{k}" for k in _normalised_biases(config)}
    assert skip, "the generator has convolutions followed by InstanceNorm"
    for role in a["models"]:
        for key, tensor in a["models"][role].items():
            name = f"{role}.{key}"
            if name in skip:
                continue
            torch.testing.assert_close(
                tensor, b["models"][role][key], rtol=0, atol=atol, msg=lambda m, k=name: f"{k}: {m}"
            )
    # Adam keeps its moments by parameter position, in the order of module.parameters()
    parameter_names = {"generator": [n for n, _ in build_generator_from_config(config).named_parameters()]}
    for role in a["optimizers"]:
        for pid, slot in a["optimizers"][role]["state"].items():
            name = f"{role}.{parameter_names[role][pid]}" if role in parameter_names else f"{role}.{pid}"
            if name in skip:
                continue
            for moment in ("exp_avg", "exp_avg_sq"):
                expected, actual = slot[moment], b["optimizers"][role]["state"][pid][moment]
                difference = torch.linalg.vector_norm(actual - expected).item()
                bound = moments_rtol * torch.linalg.vector_norm(expected).item()
                assert difference <= bound, f"{name} {moment}: |difference| {difference:.3g} > {bound:.3g}"


def test_learning_rate_is_constant_then_decays_linearly_to_zero():
    factors = [lr_factor(s, steps=10, decay_start=6) for s in range(11)]
    assert factors == pytest.approx([1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0])


@pytest.mark.parametrize("objective", ["paired", "unpaired"])
def test_resumed_run_equals_straight_run(datalist, tmp_path, objective):
    straight = train(tiny_config(datalist, f"objective={objective}"), tmp_path / "straight")
    half = tmp_path / "halves"
    train(tiny_config(datalist, f"objective={objective}", "train.steps=3"), half)
    assert load_checkpoint(half / "checkpoints" / "last.pt")["step"] == 3
    resumed = train(tiny_config(datalist, f"objective={objective}"), half, resume=True)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 6
    _assert_same_state(a, b)
    assert _rows(tmp_path / "straight") == _rows(half)  # losses, learning rates and validation per step
    assert [row["step"] for row in _rows(half)] == ["0", "1", "2", "3", "4", "5", "6"]


def test_training_writes_the_run_folder_and_self_describing_checkpoints(datalist, tmp_path):
    run = tmp_path / "run"
    last = train(tiny_config(datalist, "loss.gan=none"), run)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert list((run / "tensorboard").iterdir())
    rows = _rows(run)
    assert [r["step"] for r in rows] == [str(s) for s in range(7)]  # step 0: the untrained model validated
    assert {"g_loss", "l1_xy", "l1_yx", "lr", "val_mae", "val_psnr", "val_ssim"} <= set(rows[0])
    assert "d_loss" not in rows[0]  # no discriminators without a GAN loss
    assert rows[3]["val_psnr"] and not rows[4]["val_psnr"]  # validation every 3 steps
    payload = torch.load(last, weights_only=True)
    assert payload["step"] == 6 and payload["task"] == "ct-kernel"
    assert payload["intensity"] == {"kind": "ct-window", "window": [-900.0, 400.0]}
    # the spec is normalised: a kernel model resamples nothing, whatever data.factors says
    assert payload["spec"] == {
        "task": "ct-kernel", "channels": 1, "window": [-900.0, 400.0], "factors": [1, 1, 1],
        "upsample": "nearest", "patch_size": [24, 24, 24],
    }  # fmt: skip
    assert load_model(last, device="cpu").factors == (1, 1, 1)
    assert list(payload["models"]) == ["generator"]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best_metric"]["value"] == pytest.approx(
        max(float(r["val_psnr_margin"]) for r in rows if r["val_psnr"])
    )
    generator, config = generator_from_checkpoint(payload)
    assert config.loss.gan == "none"
    with torch.no_grad():
        assert generator(torch.zeros(1, 1, 24, 24, 24)).shape == (1, 1, 24, 24, 24)


def test_a_twenty_slice_pair_trains_with_the_gan(tmp_path):
    """A thin slab (the shared Philips kernel pair has 20 slices) trains with the PatchGAN on."""
    datalist = write_kernel_datalist(tmp_path / "thin", cases=2, shape=(40, 40, 20))
    config = tiny_config(datalist, "data.patch_size=[32, 32, 20]", "train.steps=1", "infer.target_size=16")
    last = train(config, tmp_path / "run")
    row = next(r for r in _rows(tmp_path / "run") if r["d_loss"])  # not the step-0 validation row
    assert float(row["d_loss"]) > 0 and float(row["g_loss"]) > 0
    assert torch.load(last, weights_only=True)["step"] == 1


def test_a_run_folder_is_never_silently_overwritten(datalist, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train(tiny_config(datalist), tmp_path / "empty", resume=True)
    run = tmp_path / "run"
    train(tiny_config(datalist, "train.steps=1", "loss.gan=none"), run)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(datalist, "train.steps=1"), run)


def test_cli_config_errors_exit_2_with_one_line_naming_the_key(datalist, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    save_config(tiny_config(datalist), config)
    assert (
        main(["train", "--config", str(config), "--set", "model.widht=8", "--output", str(tmp_path / "r")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "'model.widht'" in err and "\n" not in err
    assert (
        main(["train", "--config", str(config), "--set", "train.steps=ten", "--output", str(tmp_path / "r")])
        == 2
    )
    assert "'train.steps'" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path / "r")]) == 2
    assert "--config is required" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_resume_reuses_the_run_config_and_continues_from_its_step(datalist, tmp_path):
    config = tmp_path / "c.yaml"
    save_config(tiny_config(datalist, "train.steps=2", "loss.gan=none"), config)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(run)]) == 0
    assert main(["train", "--output", str(run), "--resume", "--set", "train.steps=4"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    assert [r["step"] for r in _rows(run)] == ["0", "1", "2", "3", "4"]


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_the_same_result(datalist, tmp_path):
    config = tmp_path / "c.yaml"
    overrides = ("train.steps=12", "train.checkpoint_every=2", "train.val_every=100", "loss.gan=none")
    save_config(tiny_config(datalist, *overrides), config)
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float sums as here
    command = [sys.executable, "-m", "revgan_med", "train", "--config", str(config), "--output", str(run)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (run / "metrics.csv").is_file() and len(_rows(run)) >= 5:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 2 <= killed_at < 12
    assert main(["train", "--output", str(run), "--resume"]) == 0
    straight = train(tiny_config(datalist, *overrides), tmp_path / "straight")
    # another process need not round the first steps' sums identically (float32 CPU kernels are not
    # bitwise reproducible across processes); Adam then moves small-gradient weights a few 1e-6 apart and
    # the moments by up to ~1e-3 of their size. A wrong resume (data position, RNG, schedule) moves weights
    # by ~lr = 2e-4 per step and the moments by 0.3-5 times their size (measured with another seed).
    resumed = load_checkpoint(run / "checkpoints" / "last.pt")
    _assert_same_state(load_checkpoint(straight), resumed, atol=2e-5, moments_rtol=1e-2)
    assert [r["step"] for r in _rows(run)] == [str(s) for s in range(13)]
