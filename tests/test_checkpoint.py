from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from revgan_med.checkpoints import (
    checkpoint_config,
    generator_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from revgan_med.config import Config, config_from_dict
from revgan_med.training.rng import capture_rng_state, restore_rng_state


def _draws() -> tuple:
    return torch.rand(4), np.random.standard_normal(3), random.random()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal(1)  # leaves a cached gaussian in numpy's state
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(load_checkpoint(path)["rng"])
    got = _draws()
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_generator_is_rebuilt_from_the_checkpoint_alone(tmp_path):
    from revgan_med.networks import build_generator

    config = config_from_dict(
        {"task": "dmri-sr", "model": {"generator": "rev_srcnn3d", "width": 4, "depth": 2}}
    )
    torch.manual_seed(0)
    generator = build_generator("rev_srcnn3d", in_channels=6, out_channels=6, width=4, depth=2)
    for p in generator.parameters():  # non-zero everywhere, so a fresh build cannot match by accident
        p.data.normal_(0, 0.1)
    path = save_checkpoint(tmp_path / "g.pt", {"config": config.to_dict(), "step": 7,
                                               "models": {"generator": generator.state_dict()}})  # fmt: skip
    payload = torch.load(path, weights_only=True)
    assert payload["step"] == 7 and checkpoint_config(payload) == config
    rebuilt, _ = generator_from_checkpoint(payload)
    x = torch.randn(1, 6, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), generator.eval()(x))


def test_broken_and_foreign_files_are_one_line_errors_naming_the_file(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"config": Config().to_dict()})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, needle in ((truncated, "not a readable checkpoint"), (foreign, "not a revgan-med checkpoint")):
        with pytest.raises(ValueError, match=needle) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files
