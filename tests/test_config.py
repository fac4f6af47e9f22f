from __future__ import annotations

import pytest
import yaml

from revgan_med.config import Config, ConfigError, config_from_dict, load_config, save_config


def test_defaults_match_the_design_notes():
    cfg = Config()
    assert cfg.data.window == "chest-1024"
    assert cfg.data.patch_size == [128, 128, 128]
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.train.betas == [0.5, 0.999]
    assert cfg.loss.lambda_l1 == 100.0 and cfg.loss.lambda_cycle == 10.0
    assert cfg.infer.context_size is None


def test_overrides_parse_yaml_values_and_int_is_accepted_for_float():
    cfg = config_from_dict(
        {"model": {"width": 8}},
        ["data.patch_size=[32,32,32]", "train.lr=1", "data.window=[-1000, 400]", "infer.context_size=96"],
    )
    assert cfg.model.width == 8
    assert cfg.data.patch_size == [32, 32, 32]
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.window == [-1000.0, 400.0]
    assert cfg.infer.context_size == 96


@pytest.mark.parametrize(
    ("values", "overrides", "needle"),
    [
        ({"model": {"widht": 8}}, [], "'model.widht'"),
        ({"bogus": 1}, [], "'bogus'"),
        ({}, ["train.steps=ten"], "'train.steps'"),
        ({}, ["model.memory_saving=1"], "'model.memory_saving'"),
        ({}, ["data.patch_size=[32, x]"], "'data.patch_size[1]'"),
        ({}, ["task=ct-foo"], "'task'"),
        ({"train": 3}, [], "'train'"),
        ({}, ["train.steps"], "key.path=value"),
        ({}, ["data.patch_size=[64, 64, 6]"], "'data.patch_size': the PatchGAN needs three patch sides >= 8"),
    ],
)
def test_bad_keys_and_types_are_one_line_errors_naming_the_key(values, overrides, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(values, overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_resolved_config_round_trips_through_yaml(tmp_path):
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump({"task": "ct-kernel", "model": {"depth": 2}}))
    cfg = load_config(path, ["loss.gan=none"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.task == "ct-kernel" and again.model.depth == 2 and again.loss.gan == "none"


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {width: 8, oops: 1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.oops"):
        load_config(bad)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.factors=[2,2,0]", "data.factors"),
        ("data.patch_size=[32,32]", "data.patch_size"),
        ("train.steps=0", "train.steps"),
        ("train.batch_size=-1", "train.batch_size"),
        ("train.lr=-0.1", "train.lr"),
        ("train.betas=[0.5,1.5]", "train.betas"),
        ("data.foreground_fraction=2", "data.foreground_fraction"),
        ("infer.context_size=0", "infer.context_size"),
    ],
)
def test_values_no_run_can_use_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({}, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.lambda_inverse=-1"], r"'loss\.lambda_inverse'.*>= 0"),
        (["objective=unpaired", "loss.lambda_inverse=0"], r"'loss\.lambda_inverse'.*'unpaired'"),
        (["objective=reggan", "loss.pixel=mse"], r"'loss\.pixel'.*'reggan'"),
        (["loss.pixel=l2"], r"'loss\.pixel'.*not one of l1, mse"),
        (["objective=unpaired", "loss.region=body"], r"'loss\.region'.*'unpaired'"),
        (["loss.region=lungs"], r"'loss\.region'.*not one of all, body"),
        (["task=dmri-sr", "data.augment=true"], r"'data\.augment'.*dmri-sr.*diffusion tensor"),
        (["task=dmri-sr", "infer.ensemble=true"], r"'infer\.ensemble'.*dmri-sr.*scalar"),
        (["task=dmri-sr", "loss.window=metric"], r"'loss\.window'.*dmri-sr has no metric window"),
        (["objective=unpaired", "loss.window=metric"], r"'loss\.window'.*'unpaired'"),
        (["train.linear_start=strongest"], r"'train\.linear_start'.*model\.linear_kernel"),
        (["objective=unpaired", "model.residual=true", "model.linear_kernel=[5,5,1]",
          "train.linear_start=strongest"], r"'train\.linear_start'.*objective paired"),
    ],
)
def test_settings_the_objective_or_task_cannot_honour_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, overrides)
    assert config_from_dict({}, ["loss.lambda_inverse=0"]).loss.lambda_inverse == 0
    startable = ["model.residual=true", "model.linear_kernel=[5,5,1]", "train.linear_start=strongest"]
    assert config_from_dict({}, startable).train.linear_start == "strongest"


def test_edge_values_that_runs_use_are_accepted():
    config = config_from_dict({}, ["train.lr=0", "data.num_workers=0", "data.factors=[1,1,1]"])
    assert config.train.lr == 0 and config.data.factors == [1, 1, 1]


def test_thin_patches_pass_with_the_gan_and_any_patch_without_it():
    assert config_from_dict({}, ["data.patch_size=[64, 64, 8]"]).data.patch_size == [64, 64, 8]
    assert config_from_dict({}, ["data.patch_size=[16, 16, 4]", "loss.gan=none"]).loss.gan == "none"
