from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from revgan_med.config import LossConfig, config_from_dict, load_config
from revgan_med.training.distributed import DistributedContext
from revgan_med.training.loop import build_training_objective, update
from revgan_med.training.objectives import OBJECTIVES, ImagePool, gan_loss
from revgan_med.training.objectives.base import masked_pixel_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_gan_criteria_match_their_formulas():
    logits = torch.tensor([[-2.0, 0.0, 0.5, 3.0]])
    assert gan_loss(logits, real=True, kind="lsgan").item() == pytest.approx((9 + 1 + 0.25 + 4) / 4)
    assert gan_loss(logits, real=False, kind="lsgan").item() == pytest.approx((4 + 0 + 0.25 + 9) / 4)
    sigmoid = [1 / (1 + math.exp(-v)) for v in logits[0].tolist()]
    assert gan_loss(logits, real=True, kind="vanilla").item() == pytest.approx(
        sum(-math.log(s) for s in sigmoid) / 4
    )
    assert gan_loss(logits, real=False, kind="vanilla").item() == pytest.approx(
        sum(-math.log(1 - s) for s in sigmoid) / 4
    )
    with pytest.raises(ValueError, match="hinge"):
        gan_loss(logits, real=True, kind="hinge")


def test_image_pool_fills_then_mixes_history_and_round_trips():
    torch.manual_seed(0)
    pool = ImagePool(3)
    first = torch.arange(3.0).view(3, 1)
    assert torch.equal(pool.query(first), first)  # filling: every image comes straight back
    seen = {0.0, 1.0, 2.0}
    returned = set()
    for value in range(3, 40):
        out = pool.query(torch.tensor([[float(value)]]))
        assert out.item() in seen | {float(value)}
        returned.add(out.item() == value)
        seen.add(float(value))
    assert returned == {True, False}  # both the new image and stored ones were shown
    state = pool.state_dict()
    again = ImagePool(3)
    again.load_state_dict(state)
    torch.manual_seed(1)
    a = pool.query(torch.tensor([[99.0]]))
    torch.manual_seed(1)
    b = again.query(torch.tensor([[99.0]]))
    assert torch.equal(a, b)
    assert torch.equal(ImagePool(0).query(first), first)


def _objective(objective: str, gan: str, generator: str = "rev_resnet3d", **loss):
    config = config_from_dict(
        {"objective": objective, "task": "ct-sr",
         "model": {"generator": generator, "width": 4, "depth": 2, "disc_width": 4},
         "loss": {"gan": gan, "pool_size": 2, "lambda_identity": 0.5, **loss}}
    )  # fmt: skip
    torch.manual_seed(0)
    obj = build_training_objective(config)
    optimizers = {r: torch.optim.Adam(m.parameters(), lr=1e-2) for r, m in obj.modules_by_role().items()}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return obj, {"optimizers": optimizers, "scaler": scaler, "context": CPU}


def _snapshot(obj):
    return {role: [p.detach().clone() for p in m.parameters()] for role, m in obj.modules_by_role().items()}


def _changed(before, obj) -> set[str]:
    after = _snapshot(obj)
    return {r for r in before if any(not torch.equal(a, b) for a, b in zip(before[r], after[r], strict=True))}


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(1, 1, 24, 24, 24, generator=g) * 2 - 1,
            "target": torch.rand(1, 1, 24, 24, 24, generator=g) * 2 - 1}  # fmt: skip


@pytest.mark.parametrize(
    ("objective", "gan", "generator"),
    [
        ("paired", "lsgan", "rev_resnet3d"),
        ("paired", "vanilla", "resnet3d"),
        ("unpaired", "lsgan", "rev_srcnn3d"),
        ("unpaired", "vanilla", "rev_resnet3d"),
    ],
)
def test_each_phase_gives_finite_losses_and_trains_only_its_networks(objective, gan, generator):
    obj, kwargs = _objective(objective, gan, generator)
    batch = _batch()
    before = _snapshot(obj)
    g_losses = update(obj, "generator", batch, **kwargs)
    assert all(math.isfinite(v) for v in g_losses.values())
    assert _changed(before, obj) == {"generator"}
    assert all(
        p.grad is None for role in ("disc_x", "disc_y") for p in obj.modules_by_role()[role].parameters()
    )
    before = _snapshot(obj)
    d_losses = update(obj, "discriminator", batch, **kwargs)
    assert all(math.isfinite(v) for v in d_losses.values())
    assert _changed(before, obj) == {"disc_x", "disc_y"}
    expected = {
        "paired": {"l1_xy", "l1_yx", "gan_xy", "gan_yx"},
        "unpaired": {"gan_xy", "gan_yx", "cycle_x", "cycle_y", "identity_x", "identity_y"},
    }[objective]
    assert set(g_losses) == expected | {"g_loss"}
    assert g_losses["g_loss"] == pytest.approx(sum(g_losses[k] for k in expected), rel=1e-5)
    assert set(d_losses) == {"d_loss", "d_x", "d_y"}


def test_paired_without_gan_is_lambda_times_l1_both_ways_and_has_no_discriminators():
    obj, kwargs = _objective("paired", "none")
    assert obj.discriminator_roles() == [] and list(obj.modules_by_role()) == ["generator"]
    batch = _batch()
    with torch.no_grad():
        l1_xy = F.l1_loss(obj.generator(batch["image"]), batch["target"]).item()
        l1_yx = F.l1_loss(obj.generator.inverse(batch["target"]), batch["image"]).item()
    losses = update(obj, "generator", batch, **kwargs)
    assert losses["l1_xy"] == pytest.approx(100 * l1_xy, rel=1e-5)
    assert losses["l1_yx"] == pytest.approx(100 * l1_yx, rel=1e-5)
    assert losses["g_loss"] == pytest.approx(100 * (l1_xy + l1_yx), rel=1e-5)


def test_paired_discriminators_are_conditional_and_unpaired_needs_a_gan():
    assert OBJECTIVES.get("paired").discriminator_channels(6, LossConfig()) == {"disc_x": 12, "disc_y": 12}
    assert OBJECTIVES.get("unpaired").discriminator_channels(6, LossConfig()) == {"disc_x": 6, "disc_y": 6}
    forward_only = LossConfig(lambda_inverse=0.0)
    assert OBJECTIVES.get("paired").discriminator_channels(6, forward_only) == {"disc_y": 12}
    with pytest.raises(ValueError, match="needs a GAN loss"):
        OBJECTIVES.build(
            "unpaired", generator=torch.nn.Identity(), discriminators={}, loss=LossConfig(gan="none")
        )
    with pytest.raises(ValueError, match="unknown objective 'pix2pix'"):
        OBJECTIVES.get("pix2pix")


def test_paired_inverse_weight_scales_the_y_to_x_terms_and_zero_never_runs_the_inverse(monkeypatch):
    obj, kwargs = _objective("paired", "none", "rev_srcnn3d", lambda_inverse=0.25)
    batch = _batch()
    with torch.no_grad():
        l1_xy = F.l1_loss(obj.generator(batch["image"]), batch["target"]).item()
        l1_yx = F.l1_loss(obj.generator.inverse(batch["target"]), batch["image"]).item()
    losses = update(obj, "generator", batch, **kwargs)
    assert losses["l1_yx"] == pytest.approx(0.25 * 100 * l1_yx, rel=1e-5)
    assert losses["g_loss"] == pytest.approx(100 * l1_xy + 25 * l1_yx, rel=1e-5)

    obj, kwargs = _objective("paired", "lsgan", "rev_srcnn3d", lambda_inverse=0.0)
    assert obj.discriminator_roles() == ["disc_y"]  # no D_X: nothing would train or use it

    def refuse(*args):
        raise AssertionError("the inverse ran although loss.lambda_inverse is 0")

    monkeypatch.setattr(obj.generator, "inverse", refuse)
    g_losses = update(obj, "generator", batch, **kwargs)
    d_losses = update(obj, "discriminator", batch, **kwargs)
    assert set(g_losses) == {"g_loss", "l1_xy", "gan_xy"}
    assert set(d_losses) == {"d_loss", "d_y"}


def test_paired_mse_pixel_term_is_lambda_times_the_mean_squared_error():
    obj, kwargs = _objective("paired", "none", "rev_srcnn3d", pixel="mse")
    batch = _batch()
    with torch.no_grad():
        sq_xy = ((obj.generator(batch["image"]) - batch["target"]) ** 2).mean().item()
        sq_yx = ((obj.generator.inverse(batch["target"]) - batch["image"]) ** 2).mean().item()
    losses = update(obj, "generator", batch, **kwargs)
    assert set(losses) == {"g_loss", "mse_xy", "mse_yx"}
    assert losses["mse_xy"] == pytest.approx(100 * sq_xy, rel=1e-5)
    assert losses["mse_yx"] == pytest.approx(100 * sq_yx, rel=1e-5)


def test_masked_pixel_loss_by_hand():
    prediction = torch.tensor([1.0, -2.0, 3.0, 4.0]).reshape(1, 1, 2, 2, 1)
    target = torch.zeros_like(prediction)
    mask = torch.tensor([True, True, False, False]).reshape(1, 1, 2, 2, 1)
    assert masked_pixel_loss(prediction, target, mask=mask).item() == pytest.approx(1.5)  # (1 + 2) / 2
    assert masked_pixel_loss(prediction, target, kind="mse", mask=mask).item() == pytest.approx(2.5)
    assert masked_pixel_loss(prediction, target).item() == pytest.approx(2.5)  # no mask: every voxel
    two = torch.cat([prediction, 2 * prediction], 1)  # one mask for every channel: (1 + 2 + 2 + 4) / 4
    assert masked_pixel_loss(two, torch.zeros_like(two), mask=mask).item() == pytest.approx(2.25)
    assert masked_pixel_loss(prediction, target, mask=torch.zeros_like(mask)).item() == 0.0


def test_windowed_pixel_loss_is_the_error_of_clipped_values_by_hand():
    lo, hi = -0.5, 0.5
    target = torch.tensor([-2.0, -2.0, 0.2, 0.2, 3.0, 3.0]).reshape(1, 1, 6, 1, 1)
    prediction = torch.tensor([-0.9, 0.0, 0.7, -0.1, 0.4, 0.8]).reshape(1, 1, 6, 1, 1).requires_grad_()
    errors = [0.0, 0.5, 0.3, 0.3, 0.1, 0.0]  # |clip(prediction) − clip(target)|, clipped to [-0.5, 0.5]
    loss = masked_pixel_loss(prediction, target, bounds=(lo, hi))
    assert loss.item() == pytest.approx(sum(errors) / 6)
    loss.backward()  # a prediction beyond the window reads as its edge there: no gradient
    assert prediction.grad.flatten().tolist() == pytest.approx([0, 1 / 6, 0, -1 / 6, -1 / 6, 0])
    squared = masked_pixel_loss(prediction, target, kind="mse", bounds=(lo, hi))
    assert squared.item() == pytest.approx(sum(e * e for e in errors) / 6)
    mask = torch.tensor([False, True, True, False, False, False]).reshape(1, 1, 6, 1, 1)
    assert masked_pixel_loss(prediction, target, mask=mask, bounds=(lo, hi)).item() == pytest.approx(0.4)


def test_metric_window_loss_uses_the_kernel_tasks_nlst_window_in_the_networks_units():
    config = load_config(CONFIGS / "ct_kernel_paired.yaml", ["model.width=4", "loss.gan=none",
                                                              "loss.window=metric"])
    obj = build_training_objective(config)
    ct_full = (-1024.0, 3071.0)  # the config's data window; nlst is [-900, 400] HU
    expected = [2 * (hu - ct_full[0]) / (ct_full[1] - ct_full[0]) - 1 for hu in (-900.0, 400.0)]
    assert obj.pixel_bounds == pytest.approx(expected, abs=1e-6)
    plain = load_config(CONFIGS / "ct_kernel_paired.yaml", ["model.width=4", "loss.gan=none"])
    assert build_training_objective(plain).pixel_bounds is None
    hi = expected[1]  # a target above the window predicted above it costs nothing; inside it, its distance
    batch = {"image": torch.full((1, 1, 4, 8, 8), hi + 0.1),
             "target": torch.full((1, 1, 4, 8, 8), hi + 0.3)}  # fmt: skip
    assert obj.generator_step(batch)["l1_xy"].item() == 0.0  # the untrained start: the identity
    batch["image"] = torch.full_like(batch["image"], hi - 0.1)
    assert obj.generator_step(batch)["l1_xy"].item() == pytest.approx(100 * 0.1, rel=1e-4)


def test_paired_pixel_terms_count_only_the_batch_body():
    """Errors outside the body change nothing: the loss equals the unmasked one of the body voxels."""
    obj, kwargs = _objective("paired", "none", "rev_srcnn3d")
    batch = _batch()
    body = torch.zeros_like(batch["image"], dtype=torch.bool)
    body[..., : body.shape[-1] // 2] = True
    with torch.no_grad():
        inside = body.expand_as(batch["image"])
        l1_xy = (obj.generator(batch["image"]) - batch["target"])[inside].abs().mean().item()
        l1_yx = (obj.generator.inverse(batch["target"]) - batch["image"])[inside].abs().mean().item()
    losses = update(obj, "generator", {**batch, "body": body}, **kwargs)
    assert losses["l1_xy"] == pytest.approx(100 * l1_xy, rel=1e-5)
    assert losses["l1_yx"] == pytest.approx(100 * l1_yx, rel=1e-5)


def test_shipped_sr_config_leaves_the_inverse_the_identity_so_it_is_block_averaging():
    """ct_sr_paired trains thick → thin only; the residual generator's untouched inverse stays the
    identity on the HR grid, which `infer --direction inverse` block-averages: the exact degradation."""
    config = load_config(CONFIGS / "ct_sr_paired.yaml", ["model.width=4", "model.disc_width=4",
                                                          "data.patch_size=[16,16,16]", "loss.gan=lsgan"])
    torch.manual_seed(0)
    obj = build_training_objective(config)
    assert obj.discriminator_roles() == ["disc_y"]
    optimizers = {r: torch.optim.Adam(m.parameters(), lr=1e-2) for r, m in obj.modules_by_role().items()}
    kwargs = {"optimizers": optimizers, "scaler": torch.amp.GradScaler("cpu", enabled=False), "context": CPU}
    batch = {k: v[..., :16, :16, :16] for k, v in _batch().items()}
    before = obj.generator(batch["image"]).detach()
    for _ in range(2):
        update(obj, "generator", batch, **kwargs)
        update(obj, "discriminator", batch, **kwargs)
    with torch.no_grad():
        assert not torch.equal(obj.generator(batch["image"]), before)  # the forward direction trained
        assert torch.equal(obj.generator.inverse(batch["target"]), batch["target"])
