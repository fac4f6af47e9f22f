"""The generator's weight average (``train.ema_decay``): its arithmetic, and what a run saves."""

from __future__ import annotations

import pytest
import torch
from _training_data import tiny_config, write_kernel_datalist

from revgan_med.checkpoints import generator_from_checkpoint, load_checkpoint
from revgan_med.config import ConfigError
from revgan_med.export import exported_payload
from revgan_med.training.averaging import WeightAverage, warm_decay
from revgan_med.training.loop import train


def test_decay_warms_up_then_stays():
    assert warm_decay(0.999, 1) == pytest.approx(2 / 11)
    assert warm_decay(0.999, 90) == pytest.approx(91 / 100)
    assert warm_decay(0.3, 3) == 0.3  # 4/13 > 0.3


def test_average_matches_a_hand_computed_moving_average():
    module = torch.nn.Linear(1, 1, bias=False)
    module.register_buffer("fitted", torch.zeros(1))
    module.weight.data.fill_(1.0)
    average = WeightAverage(module, decay=0.3)
    expected = 1.0
    for value, decay in ((3.0, 2 / 11), (-1.0, 3 / 12), (5.0, 0.3)):  # warm-up, then the set decay
        module.weight.data.fill_(value)
        module.fitted.fill_(value)
        average.update(module)
        expected = decay * expected + (1 - decay) * value
        assert average.module.weight.item() == pytest.approx(expected)
        assert average.module.fitted.item() == value  # buffers follow the model, not averaged
    assert average.updates == 3 and not average.module.weight.requires_grad
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(module, decay=1.0)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return write_kernel_datalist(tmp_path_factory.mktemp("kernel"))


OVERRIDES = ("loss.gan=none", "train.lr=0.01")


def test_averaging_leaves_training_alone_and_saves_the_average_for_inference(datalist, tmp_path):
    plain = load_checkpoint(train(tiny_config(datalist, *OVERRIDES), tmp_path / "plain"))
    config = tiny_config(datalist, *OVERRIDES, "train.ema_decay=0.9")
    averaged = load_checkpoint(train(config, tmp_path / "ema"))
    assert averaged["ema_updates"] == 6
    for key, weights in plain["models"]["generator"].items():  # the optimiser saw the same run
        torch.testing.assert_close(averaged["training_generator"][key], weights, rtol=0, atol=1e-6)
    changed = [
        k for k, w in averaged["models"]["generator"].items()
        if not torch.allclose(w, averaged["training_generator"][k], atol=1e-6)
    ]  # fmt: skip
    assert changed, "inference weights are the average, not the last step's"
    generator, _ = generator_from_checkpoint(averaged)
    key = changed[0]
    torch.testing.assert_close(generator.state_dict()[key], averaged["models"]["generator"][key])
    exported = exported_payload(tmp_path / "ema" / "checkpoints" / "last.pt")
    assert "training_generator" not in exported and "ema_updates" not in exported


def test_a_resumed_averaging_run_equals_the_straight_run(datalist, tmp_path):
    config = tiny_config(datalist, *OVERRIDES, "train.ema_decay=0.9")
    straight = load_checkpoint(train(config, tmp_path / "straight"))
    train(tiny_config(datalist, *OVERRIDES, "train.ema_decay=0.9", "train.steps=3"), tmp_path / "halves")
    resumed = load_checkpoint(train(config, tmp_path / "halves", resume=True))
    assert resumed["ema_updates"] == straight["ema_updates"] == 6
    for entry in ("models", "training_generator"):
        a = straight[entry]["generator"] if entry == "models" else straight[entry]
        b = resumed[entry]["generator"] if entry == "models" else resumed[entry]
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def test_decay_outside_zero_one_is_refused(datalist):
    with pytest.raises(ConfigError, match="train.ema_decay"):
        tiny_config(datalist, "train.ema_decay=1.0")
