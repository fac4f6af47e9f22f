from __future__ import annotations

import json
from pathlib import Path

import pytest
from _training_data import tiny_config, write_kernel_datalist

from revgan_med.cli import main
from revgan_med.config import save_config
from revgan_med.tasks import (
    DEFAULT_WINDOW,
    WINDOWS,
    TaskSpec,
    datalist_spec,
    evaluation_window,
    parse_factors,
    training_spec,
)


def test_factors_are_parsed_and_validated_in_one_place():
    assert parse_factors("2,2,4") == (2, 2, 4)
    assert parse_factors([1, 3, 1]) == (1, 3, 1)
    assert parse_factors((2.0, 2, 2)) == (2, 2, 2)
    for bad in ("2,2", "0,1,1", "a,b,c", [2.5, 1, 1], [True, 1, 1], "1,1,1,1", [float("inf"), 1, 1]):
        with pytest.raises(ValueError, match="three positive integers"):
            parse_factors(bad)


def test_spec_normalises_task_facts_and_round_trips():
    kernel = TaskSpec.create("ct-kernel", window="nlst", factors=(2, 2, 4))
    assert kernel.factors == (1, 1, 1) and kernel.window == WINDOWS["nlst"]
    dmri = TaskSpec.create("dmri-sr", window="nlst", factors="2,2,2", upsample="nearest", patch_size=[24] * 3)
    assert dmri.window is None and dmri.channels == 6 and dmri.patch_size == (24, 24, 24)
    assert TaskSpec.create("ct-sr").window is None  # left open: the default applies where it is used
    for spec in (kernel, dmri, TaskSpec.create("ct-sr", window=[-100, 200], upsample="tricubic")):
        assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="task 'mri'"):
        TaskSpec.create("mri")
    with pytest.raises(ValueError, match="upsample"):
        TaskSpec.create("ct-sr", upsample="bicubic")


def test_mismatches_name_each_differing_fact_and_ignore_an_open_window():
    config = TaskSpec.create("ct-sr", window="chest-1024", factors=(2, 2, 4), upsample="tricubic")
    assert config.mismatches(TaskSpec.create("ct-sr", factors=(2, 2, 4))) == []
    assert config.mismatches(TaskSpec.create("ct-sr", window="nlst", factors=(2, 2, 2))) == [
        "factors 2,2,4, data 2,2,2",
        "window -1150,350, data -900,400",
    ]


def test_evaluation_window_prefers_given_then_model_then_task_default():
    assert evaluation_window("ct-sr", "nlst", (-1024.0, 3071.0)) == WINDOWS["nlst"]
    assert evaluation_window("ct-sr", None, (-1024.0, 3071.0)) == (-1024.0, 3071.0)
    assert evaluation_window("ct-kernel", None, (-1024.0, 3071.0)) == WINDOWS["nlst"]  # judged in nlst
    assert evaluation_window("ct-sr") == WINDOWS[DEFAULT_WINDOW]
    assert evaluation_window("dmri-sr") is None


def _with_spec(datalist: Path, **spec) -> Path:
    values = json.loads(datalist.read_text())
    out = datalist.with_name("with_spec.json")
    out.write_text(json.dumps({**values, "spec": TaskSpec.create(**spec).to_dict()}))
    return out


def test_training_spec_checks_the_config_against_the_preprocessed_data(tmp_path):
    datalist = write_kernel_datalist(tmp_path, cases=2, shape=(8, 8, 8))
    assert datalist_spec(datalist) is None  # a hand-written datalist: nothing to check
    assert training_spec(tiny_config(datalist)).window == WINDOWS["nlst"]
    same = _with_spec(datalist, task="ct-kernel", window="nlst")
    assert training_spec(tiny_config(same)).factors == (1, 1, 1)
    other = _with_spec(datalist, task="ct-kernel", window="ct-full")
    with pytest.raises(ValueError, match="window -900,400, data -1024,3071"):
        training_spec(tiny_config(other))


def test_train_cli_refuses_a_config_that_contradicts_the_datalist_in_one_line(tmp_path, capsys):
    datalist = _with_spec(write_kernel_datalist(tmp_path, cases=2, shape=(8, 8, 8)), task="ct-sr")
    config = tmp_path / "c.yaml"
    save_config(tiny_config(datalist), config)
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "task ct-kernel, data ct-sr" in err and str(datalist) in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_checkpoint_takes_task_window_and_factors_from_the_model(tmp_path, capsys):
    import numpy as np

    from revgan_med.checkpoints import save_checkpoint
    from revgan_med.config import config_from_dict
    from revgan_med.io import save_volume

    config = config_from_dict({"task": "ct-sr", "data": {"window": "ct-full", "factors": [1, 1, 2]}})
    spec = TaskSpec.from_config(config)
    checkpoint = save_checkpoint(tmp_path / "model.pt", {"config": config.to_dict(), "spec": spec.to_dict()})
    rng = np.random.default_rng(0)
    reference = rng.uniform(-1500, 2000, (12, 12, 12)).astype(np.float32)
    save_volume(reference, np.eye(4), tmp_path / "ref.nii.gz")
    noisy = reference + rng.normal(0, 50, reference.shape).astype(np.float32)
    save_volume(noisy, np.eye(4), tmp_path / "p.nii.gz")
    files = {"--prediction": tmp_path / "p.nii.gz", "--reference": tmp_path / "ref.nii.gz"}
    common = ["evaluate", *(str(v) for item in files.items() for v in item)]
    outputs = {}
    for name, extra in {
        "checkpoint": ["--checkpoint", str(checkpoint)],
        "typed": ["--task", "ct-sr", "--window=-1024,3071", "--factors", "1,1,2"],
        "default": [],
    }.items():
        assert main([*common, *extra, "--output", str(tmp_path / f"{name}.csv")]) == 0
        outputs[name] = (tmp_path / f"{name}.csv").read_text()
        assert ("window: -1024,3071" in capsys.readouterr().out) is (name != "default")
    assert outputs["checkpoint"] == outputs["typed"] != outputs["default"]
