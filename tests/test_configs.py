from __future__ import annotations

from pathlib import Path

import pytest

from revgan_med.config import load_config
from revgan_med.data.transforms import parse_window
from revgan_med.networks import generator_names
from revgan_med.tasks import TASK_CHANNELS
from revgan_med.training.objectives import OBJECTIVES

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
EXPECTED = {
    "ct_sr_paired",
    "ct_sr_unpaired",
    "ct_kernel_paired",
    "ct_kernel_unpaired",
    "dmri_sr_paired",
    "demo",
}


def test_every_experiment_has_a_config():
    assert {p.stem for p in CONFIGS} >= EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_strictly_and_names_valid_parts(path):
    config = load_config(path)
    assert config.objective in OBJECTIVES
    assert config.model.generator in generator_names()
    assert config.train.decay_start <= config.train.steps
    if config.task != "dmri-sr":
        parse_window(config.data.window)


def test_thesis_settings():
    sr = load_config(CONFIGS[0].parent / "ct_sr_paired.yaml")
    assert (sr.data.patch_size, sr.data.window, sr.data.factors) == ([128] * 3, "chest-1024", [2, 2, 4])
    assert (sr.loss.lambda_l1, sr.train.betas) == (100.0, [0.5, 0.999])
    assert sr.loss.lambda_inverse == 0  # super-resolution trains thick → thin only (README, "Differences")
    # the thesis's rate everywhere except where a higher one was measured better (README, "Differences")
    assert sr.train.lr == 1e-3
    assert load_config(CONFIGS[0].parent / "ct_kernel_paired.yaml").train.lr == 2e-4
    # kernel conversion: the network sees the whole scanner range and has linear paths (README, "Differences")
    for name in ("ct_kernel_paired", "ct_kernel_unpaired", "ct_kernel_selfinverse"):
        assert load_config(CONFIGS[0].parent / f"{name}.yaml").data.window == "ct-full"
    kernel = load_config(CONFIGS[0].parent / "ct_kernel_paired.yaml")
    assert kernel.model.linear_kernel == [7, 7, 1]
    # in HU, from the least-squares start: the nlst-window options traded the body for the slices (README)
    assert (kernel.loss.window, kernel.train.linear_start) == ("data", "least-squares")
    unpaired = load_config(CONFIGS[0].parent / "ct_sr_unpaired.yaml")
    assert (unpaired.objective, unpaired.loss.lambda_cycle, unpaired.loss.pool_size) == ("unpaired", 10.0, 50)
    dmri = load_config(CONFIGS[0].parent / "dmri_sr_paired.yaml")
    assert dmri.data.patch_size == [24] * 3 and TASK_CHANNELS[dmri.task] == 6
    demo = load_config(CONFIGS[0].parent / "demo.yaml")
    assert max(demo.data.patch_size) <= 32 and demo.model.width <= 16 and demo.train.steps <= 500


def test_untrained_dmri_model_is_tricubic_interpolation():
    """dmri_sr_paired: tricubic input + residual generator, so training starts from the best classical
    baseline; the DTI scaling is fitted inside the input's (masked) brain."""
    import numpy as np
    import torch

    from revgan_med.checkpoints import build_generator_from_config
    from revgan_med.data.degradation import upsample_to_hr
    from revgan_med.inference import Model, infer_volume

    config = load_config(CONFIGS[0].parent / "dmri_sr_paired.yaml", ["model.width=4", "model.depth=1"])
    assert (config.data.upsample, config.model.residual, config.model.disc_width) == ("tricubic", True, 16)
    torch.manual_seed(0)
    generator = build_generator_from_config(config).eval()
    lr = np.zeros((10, 9, 8, 6), np.float32)
    lr[2:8, 2:7, 2:6] = np.random.default_rng(0).normal(size=(6, 5, 4, 6)) * 1e-3  # zero outside the brain
    model = Model(generator, "dmri-sr", {"kind": "dti-scale", "percentile": 99.5, "scales": None},
                  (24, 24, 24), factors=(2, 2, 2), upsample="tricubic", target_size=8)  # fmt: skip
    out = infer_volume(model, lr, np.eye(4))
    expected, affine = upsample_to_hr(lr, np.eye(4), (2, 2, 2), mode="tricubic")
    np.testing.assert_allclose(out.array, expected, atol=1e-9)
    np.testing.assert_allclose(out.affine, affine)
