"""The generators' linear path: least-squares fit against known filters, zero start, sharing, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _training_data import tiny_config, write_kernel_datalist
from scipy import ndimage

from revgan_med.checkpoints import load_checkpoint
from revgan_med.config import ConfigError, LossConfig
from revgan_med.networks import build_generator
from revgan_med.networks.linear import (
    BLUR_SIGMAS,
    UNSHARP_AMOUNTS,
    DomainGate,
    LinearPath,
    classical_filter,
)
from revgan_med.training.loop import build_training_objective, train
from revgan_med.training.objectives import build_objective


def _filtered(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Valid (unpadded) convolution: the voxels whose whole neighbourhood lies inside `x`."""
    return F.conv3d(x, weight, bias)


def test_solve_recovers_a_known_filter_and_bias_from_several_pairs():
    torch.manual_seed(0)
    weight, bias = torch.randn(2, 3, 5, 3, 1), torch.tensor([0.5, -2.0])
    path = LinearPath(3, 2, (5, 3, 1))
    sums = []
    for size in ((12, 10, 6), (9, 14, 4)):
        x = torch.randn(2, 3, *size)
        target = torch.zeros(2, 2, *size)  # only the interior is fitted: the zero border must not count
        target[:, :, 2:-2, 1:-1, :] = _filtered(x, weight, bias)
        sums.append(path.normal_equations(x, target))
    path.solve(*(a + b for a, b in zip(*sums, strict=True)))
    torch.testing.assert_close(path.weight.data, weight, atol=1e-4, rtol=0)
    torch.testing.assert_close(path.bias.data, bias, atol=1e-4, rtol=0)
    with torch.no_grad():  # the solution is kept apart from the weights that train on
        path.weight.zero_()
        x = torch.randn(1, 3, 9, 7, 2)
        interior = path.solved(x)[:, :, 2:-2, 1:-1]
        torch.testing.assert_close(interior, _filtered(x, weight, bias), atol=1e-4, rtol=0)


def test_solve_does_not_depend_on_the_intensity_offset_and_recovers_a_sharpening_filter():
    """Sharpening a smooth input as the ct-full window sees soft tissue: small variance around −0.5. The
    fit must be the same with the offset removed (only the bias moves) and recover the filter; a ridge
    on the raw diagonal, which the squared offset dominates, moved its centre weight by 1.6."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 48, 48, 3)
    for _ in range(3):
        x = F.conv3d(x, torch.full((1, 1, 3, 3, 1), 1 / 9), padding=(1, 1, 0))
    x = 0.01 * x / x.std()
    sharpen = torch.zeros(1, 1, 5, 5, 1)
    sharpen[0, 0, 2, 2], sharpen[0, 0, [1, 3, 2, 2], [2, 2, 1, 3]] = 9.0, -2.0
    fits = []
    for offset in (0.0, -0.5):
        target = F.pad(_filtered(x + offset, sharpen, torch.zeros(1)), (0, 0, 2, 2, 2, 2))
        path = LinearPath(1, 1, (5, 5, 1))
        path.solve(*path.normal_equations(x + offset, target))
        fits.append((path.weight.data.clone(), path.bias.item()))
    torch.testing.assert_close(fits[0][0], fits[1][0], atol=1e-3, rtol=0)  # float32 rounding of x − 0.5
    torch.testing.assert_close(fits[1][0], sharpen, atol=0.05, rtol=0)
    assert abs(fits[0][1]) < 1e-6 and abs(fits[1][1]) < 1e-4  # the filter sums to 1: the offset passes


@pytest.mark.parametrize(("shape", "value"), [((8, 8, 2), -0.9), ((31, 29, 5), 0.7), ((64, 64, 8), -0.9)])
def test_solve_on_flat_data_keeps_zero_weights_and_fits_the_bias(shape, value):
    """Constant input: no filter to fit, however the float64 sums round (here to ±1e-10 and below); the
    bias is the mean of the target's fitted (interior) voxels."""
    torch.manual_seed(0)
    path = LinearPath(1, 1, (3, 3, 1))
    source, target = torch.full((1, 1, *shape), value), 0.25 + torch.rand(1, 1, *shape)
    path.solve(*path.normal_equations(source, target))
    assert path.weight.abs().max() == 0
    assert abs(path.bias.item() - target[:, :, 1:-1, 1:-1].double().mean().item()) < 1e-6


def test_unclipped_marks_voxels_away_from_clipped_input_and_target():
    path = LinearPath(1, 1, (3, 3, 1))
    source, target = torch.zeros(1, 1, 7, 7, 1), torch.zeros(1, 1, 7, 7, 1)
    source[0, 0, 1, 1, 0] = -1.0  # at the lower bound: clipped
    target[0, 0, 5, 4, 0] = 1.5  # above the upper bound
    valid = path.unclipped(source, target, (-1.0, 1.0))[0, 0, :, :, 0]
    expected = torch.ones(7, 7, dtype=torch.bool)
    expected[0:3, 0:3] = False  # every voxel with the clipped input voxel in its 3×3 neighbourhood
    expected[5, 4] = False
    assert torch.equal(valid, expected)


def test_paired_fit_leaves_clipped_voxels_out():
    """y is a known 3×3 filter of x, then clipped to [-1, 1] as a CT window clips: fitting all voxels
    bends the filter towards the clipped ones; leaving them out recovers it exactly."""
    torch.manual_seed(0)
    weight = torch.tensor([[0.0, -0.5, 0.0], [-0.5, 3.0, -0.5], [0.0, -0.5, 0.0]]).reshape(1, 1, 3, 3, 1)
    x = torch.rand(4, 1, 16, 16, 2) * 0.7 - 0.35
    x[:, :, :4] = -1.0  # a clipped "air" band in the input
    y = F.pad(_filtered(x, weight, torch.zeros(1)), (0, 0, 1, 1, 1, 1)).clamp(-1.0, 1.0)
    fits = {}
    for clip in (None, (-1.0, 1.0)):
        gen = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                              linear_kernel=[3, 3, 1])  # fmt: skip
        objective = build_objective("paired", generator=gen, discriminators={}, loss=LossConfig(gan="none"))
        assert objective.fit_linear_paths(iter([{"image": x, "target": y}]), clip=clip)
        fits[clip] = gen.lin_y.weight.data  # residual generator: the path fits y − x
    identity = torch.zeros(1, 1, 3, 3, 1)
    identity[0, 0, 1, 1, 0] = 1.0
    torch.testing.assert_close(fits[(-1.0, 1.0)] + identity, weight, atol=1e-4, rtol=0)
    assert (fits[None] + identity - weight).abs().max() > 0.05


def test_paired_fit_counts_only_the_batch_body():
    """Inside the body y is a known 3×3 filter of x, outside it unrelated noise (a couch, streaks): with
    the batch's ``body`` mask (``loss.region: body``) the fit recovers the filter exactly, without it not."""
    torch.manual_seed(0)
    weight = torch.tensor([[0.0, -0.5, 0.0], [-0.5, 3.0, -0.5], [0.0, -0.5, 0.0]]).reshape(1, 1, 3, 3, 1)
    x = torch.rand(2, 1, 16, 16, 2) * 0.4
    y = F.pad(_filtered(x, weight, torch.zeros(1)), (0, 0, 1, 1, 1, 1))
    body = torch.zeros_like(x, dtype=torch.bool)
    body[:, :, 4:13, 3:14] = True
    y = torch.where(body, y, torch.rand_like(y) - 0.5)
    fits = []
    for extra in ({}, {"body": body}):
        gen = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                              linear_kernel=[3, 3, 1])  # fmt: skip
        objective = build_objective("paired", generator=gen, discriminators={}, loss=LossConfig(gan="none"))
        assert objective.fit_linear_paths(iter([{"image": x, "target": y, **extra}]), clip=(-1.0, 1.0))
        fits.append(gen.lin_y.weight.data.clone())
    identity = torch.zeros(1, 1, 3, 3, 1)
    identity[0, 0, 1, 1, 0] = 1.0
    torch.testing.assert_close(fits[1] + identity, weight, atol=1e-4, rtol=0)
    assert (fits[0] + identity - weight).abs().max() > 0.05


def test_a_path_whose_fit_voxels_are_all_clipped_stays_zero():
    gen = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                          linear_kernel=[3, 3, 1])  # fmt: skip
    objective = build_objective("paired", generator=gen, discriminators={}, loss=LossConfig(gan="none"))
    x = torch.rand(1, 1, 8, 8, 2) * 0.5
    with pytest.warns(UserWarning, match="every fit voxel is clipped") as caught:  # target all at the bound
        assert objective.fit_linear_paths(iter([{"image": x, "target": torch.ones_like(x)}]), clip=(-1, 1))
    assert {str(w.message).split(":")[0] for w in caught} == {"linear path X → Y", "linear path Y → X"}
    assert gen.lin_x.weight.abs().sum() == 0 and gen.lin_y.weight.abs().sum() == 0


def test_symmetric_solve_is_least_squares_over_the_tied_weights():
    """A 3×3 in-plane filter tied by mirror and x↔y symmetry has three unknowns (centre, the four edge
    and the four corner neighbours) plus the bias: the same fit as torch.linalg.lstsq on summed columns."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 11, 9, 4)
    asymmetric = torch.randn(1, 1, 3, 3, 1)
    target = F.pad(_filtered(x, asymmetric, torch.tensor([0.3])), (0, 0, 1, 1, 1, 1))
    target[:, :, 1:-1, 1:-1] += 0.1 * torch.randn_like(target[:, :, 1:-1, 1:-1])
    path = LinearPath(1, 1, (3, 3, 1))
    path.solve(*path.normal_equations(x, target), symmetric=True)
    cols = x[:, 0].unfold(1, 3, 1).unfold(2, 3, 1).reshape(-1, 9)  # rows (b, x, y, z), columns 3·dx + dy
    tied = torch.stack([cols[:, 4], cols[:, [1, 3, 5, 7]].sum(1), cols[:, [0, 2, 6, 8]].sum(1),
                        torch.ones(len(cols))], 1).double()  # fmt: skip
    values = target[:, 0, 1:-1, 1:-1].reshape(-1, 1).double()
    centre, edge, corner, bias = torch.linalg.lstsq(tied, values).solution.flatten().tolist()
    expected = torch.tensor([[corner, edge, corner], [edge, centre, edge], [corner, edge, corner]])
    torch.testing.assert_close(path.weight.data[0, 0, :, :, 0], expected.float(), atol=1e-4, rtol=0)
    assert abs(path.bias.item() - bias) < 1e-4


def test_symmetric_solve_regularises_each_weight_like_the_free_solve():
    """Sharpening a smooth input is ill-conditioned, so the ridge shapes the answer: for a symmetric truth
    the tied fit must match the free one, not damp the orbits whose weights it sums."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 40, 40, 3)
    for _ in range(3):
        x = F.conv3d(x, torch.full((1, 1, 3, 3, 1), 1 / 9), padding=(1, 1, 0))
    sharpen = torch.zeros(1, 1, 5, 5, 1)
    sharpen[0, 0, 2, 2], sharpen[0, 0, [1, 3, 2, 2], [2, 2, 1, 3]] = 5.0, -1.0
    path = LinearPath(1, 1, (5, 5, 1))
    equations = path.normal_equations(x, F.pad(_filtered(x, sharpen, torch.zeros(1)), (0, 0, 2, 2, 2, 2)))
    path.solve(*equations)
    free = path.weight.data.clone()
    path.solve(*equations, symmetric=True)
    torch.testing.assert_close(path.weight.data, free, atol=0.02, rtol=0)


def test_path_rejects_even_kernels_and_inputs_smaller_than_the_kernel():
    with pytest.raises(ValueError, match="three odd positive"):
        LinearPath(1, 1, (4, 3, 1))
    with pytest.raises(ValueError, match="smaller than it"):
        LinearPath(1, 1, (7, 7, 1)).normal_equations(torch.zeros(1, 1, 6, 8, 8), torch.zeros(1, 1, 6, 8, 8))


@pytest.mark.parametrize("name", ["rev_srcnn3d", "resnet3d"])
def test_generator_with_linear_path_starts_as_without_and_handles_tiny_volumes(name):
    torch.manual_seed(0)
    plain = build_generator(name, in_channels=1, out_channels=1, width=4, depth=1, residual=True)
    torch.manual_seed(0)
    linear = build_generator(name, in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                             linear_kernel=[7, 7, 1])  # fmt: skip
    assert {k for k in linear.state_dict() if k.startswith("lin_")} == {
        f"lin_{d}.{s}{p}" for d in "xy" for s in ("", "solved_") for p in ("weight", "bias")
    }
    assert {n for n, _ in linear.named_parameters() if n.startswith("lin_")} == {
        "lin_x.weight", "lin_x.bias", "lin_y.weight", "lin_y.bias"
    }  # the solution is kept, not trained
    x = torch.randn(1, 1, 5, 3, 2)  # smaller than the kernel in-plane: replicate padding still works
    with torch.no_grad():
        torch.testing.assert_close(linear(x), plain(x))
        torch.testing.assert_close(linear(x), x)  # residual and zero path: the identity
        linear.lin_y.bias.fill_(0.25)
        torch.testing.assert_close(linear(x), x + 0.25)
        torch.testing.assert_close(linear.inverse(x), x)


def test_correction_on_a_linear_path_is_gated_from_zero_and_grows_by_at_most_lr_per_step():
    torch.manual_seed(0)
    gen = build_generator("rev_resnet3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                          linear_kernel=[3, 3, 1])  # fmt: skip
    weight = torch.randn(1, 1, 3, 3, 1)
    with torch.no_grad():
        gen.lin_y.weight.copy_(weight)
    x, y = torch.randn(1, 1, 8, 8, 4), torch.randn(1, 1, 8, 8, 4)
    filtered = F.conv3d(F.pad(x, (0, 0, 1, 1, 1, 1), mode="replicate"), weight)
    with torch.no_grad():
        torch.testing.assert_close(gen(x), x + filtered)  # untrained: input plus the filter, exactly
    # the decoder's last conv is random (a zero gate needs a non-zero correction to get a gradient)
    assert gen.dec_y[-2].weight.abs().sum() > 0 and gen.gate == 0
    lr = 2e-4
    optimizer = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
    F.l1_loss(gen(x), y).backward()
    optimizer.step()
    with torch.no_grad():  # Adam's first step moves the gate by lr; the ResNet decoder ends in tanh (|·| ≤ 1)
        correction = gen(x) - x - gen.linear_part(x, inverse=False)
    assert gen.gate.abs().item() == pytest.approx(lr, rel=1e-3)
    assert 0 < correction.abs().max().item() <= lr * 1.001


def test_weights_saved_without_a_gate_load_with_the_correction_ungated():
    def build():
        return build_generator("rev_resnet3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                               linear_kernel=[3, 3, 1])  # fmt: skip

    torch.manual_seed(0)
    old, new = build(), build()
    with torch.no_grad():
        old.gate.fill_(1.0)
    state = {k: v for k, v in old.state_dict().items() if k != "gate"}
    new.load_state_dict(state)
    x = torch.randn(1, 1, 8, 8, 4)
    with torch.no_grad():
        assert new.gate.item() == 1.0 and torch.equal(new(x), old(x))


def test_a_direction_switched_to_its_baseline_is_exactly_its_solved_linear_filter():
    def build():
        return build_generator("rev_resnet3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                               linear_kernel=[3, 3, 1])  # fmt: skip

    torch.manual_seed(0)
    gen = build()
    wy, wx = torch.randn(1, 1, 3, 3, 1), torch.randn(1, 1, 3, 3, 1)
    x = torch.randn(1, 1, 8, 8, 4)

    def filtered(weight: torch.Tensor) -> torch.Tensor:
        return x + F.conv3d(F.pad(x, (0, 0, 1, 1, 1, 1), mode="replicate"), weight)

    with torch.no_grad():  # solved, then trained on: the switched direction is the solution
        gen.lin_y.solved_weight.copy_(wy)
        gen.lin_x.solved_weight.copy_(wx)
        gen.lin_y.weight.copy_(wy + 0.1)
        gen.lin_x.weight.copy_(wx - 0.1)
        gen.gate.fill_(1.0)
        on = gen(x), gen.inverse(x)
        assert not torch.allclose(on[0], filtered(wy), atol=1e-3)  # the correction and trained path
        gen.baseline_only.copy_(torch.tensor([True, False]))
        torch.testing.assert_close(gen(x), filtered(wy))
        assert torch.equal(gen.inverse(x), on[1])
        gen.baseline_only.copy_(torch.tensor([False, True]))
        assert torch.equal(gen(x), on[0])
        torch.testing.assert_close(gen.inverse(x), filtered(wx))
        new = build()  # weights saved before the switch existed: both corrections on
        new.load_state_dict({k: v for k, v in gen.state_dict().items() if k != "baseline_only"})
        assert not new.baseline_only.any() and torch.equal(new(x), on[0])


def test_paired_objective_fits_each_direction_to_what_the_network_leaves():
    """y is a known filter of x: after the fit the forward generator reproduces y in the interior, and the
    inverse path is the least-squares filter from y back to x (checked against torch.linalg.lstsq)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(1, 1, 3, 3, 3) * 0.3, torch.tensor([0.1])
    xs = [torch.randn(1, 1, 12, 12, 12) for _ in range(3)]
    batches = [{"image": x, "target": F.pad(_filtered(x, weight, bias), (1,) * 6)} for x in xs]
    gen = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                          linear_kernel=[3, 3, 3])  # fmt: skip
    objective = build_objective("paired", generator=gen, discriminators={}, loss=LossConfig(gan="none"))
    assert objective.fit_linear_paths(iter(batches))
    with torch.no_grad():
        for batch in batches:
            inner = gen(batch["image"])[..., 1:-1, 1:-1, 1:-1]
            torch.testing.assert_close(inner, batch["target"][..., 1:-1, 1:-1, 1:-1], atol=1e-4, rtol=0)
    # inverse: rows = 3³ neighbourhoods of y (+1), targets x − y at the interior voxels
    rows, targets = [], []
    for batch in batches:
        y, x = batch["target"][0, 0], batch["image"][0, 0]
        cols = y.unfold(0, 3, 1).unfold(1, 3, 1).unfold(2, 3, 1).reshape(-1, 27)
        rows.append(torch.cat([cols, torch.ones(len(cols), 1)], 1))
        targets.append((x - y)[1:-1, 1:-1, 1:-1].reshape(-1, 1))
    expected = torch.linalg.lstsq(torch.cat(rows).double(), torch.cat(targets).double()).solution
    fitted = gen.lin_x.weight.data.reshape(-1).double()
    torch.testing.assert_close(fitted, expected[:-1, 0], atol=1e-3, rtol=0)


def test_unpaired_objective_and_generators_without_paths_fit_nothing():
    gen = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=1, linear_kernel=[3, 3, 3])
    unpaired = build_objective("unpaired", generator=gen, discriminators={"disc_x": torch.nn.Identity(),
                               "disc_y": torch.nn.Identity()}, loss=LossConfig())  # fmt: skip
    batches = iter([{"image": torch.zeros(1, 1, 8, 8, 8), "target": torch.zeros(1, 1, 8, 8, 8)}])
    assert not unpaired.fit_linear_paths(batches)
    assert next(batches, None) is not None  # nothing consumed
    plain = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=1)
    paired = build_objective("paired", generator=plain, discriminators={}, loss=LossConfig(gan="none"))
    assert not paired.fit_linear_paths(batches)


def test_self_inverse_keeps_both_paths_and_its_gate_picks_the_direction():
    gen = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                          linear_kernel=[1, 1, 1])  # fmt: skip
    objective = build_objective("self-inverse", generator=gen, discriminators={}, loss=LossConfig(gan="none"))
    f = objective.generator
    assert f.lin_x is not f.lin_y
    # x → 3x and 3x → x: no straight line does both, the gated pair of paths (2v and −2v/3) does
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8, 8) + 0.5
    batches = [{"image": x[:4], "target": 3 * x[:4]}, {"image": x[4:], "target": 3 * x[4:]}]
    assert objective.fit_linear_paths(iter(batches))
    assert float(f.lin_y.weight.detach()) == pytest.approx(2.0, abs=1e-4)
    assert float(f.lin_x.weight.detach()) == pytest.approx(-2.0 / 3.0, abs=1e-4)
    fresh = torch.rand(3, 1, 8, 8, 8) + 0.5
    with torch.no_grad():
        torch.testing.assert_close(f(fresh), 3 * fresh, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(f(3 * fresh), fresh, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(f.inverse(3 * fresh), fresh, rtol=1e-4, atol=1e-4)


def test_self_inverse_paths_are_fitted_not_trained(tmp_path):
    gen = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                          linear_kernel=[3, 3, 1])  # fmt: skip
    objective = build_objective("self-inverse", generator=gen, discriminators={}, loss=LossConfig(gan="none"))
    f = objective.generator
    x = torch.rand(2, 1, 12, 12, 4)
    assert objective.fit_linear_paths(iter([{"image": x, "target": 2 * x}]))
    before = {k: v.clone() for k, v in f.state_dict().items()}
    optimiser = torch.optim.Adam(f.parameters(), lr=0.1)
    for batch in ({"image": x, "target": 2 * x}, {"image": 2 * x, "target": x}):
        optimiser.zero_grad()
        objective.generator_step(batch)["loss"].backward()
        optimiser.step()
    after = f.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith(("lin_", "domain")) for k in changed)
    bad = tiny_config(write_kernel_datalist(tmp_path), "objective=self-inverse",
                      "model.linear_kernel=[3,3,1]", "train.linear_fit_batches=0")  # fmt: skip
    with pytest.raises(ConfigError, match="linear_fit_batches"):
        build_training_objective(bad)


def test_domain_gate_tells_smooth_from_sharp_windows_of_equal_variance():
    gate = DomainGate([5, 5, 1])

    def windows(seed: int, smooth: bool) -> torch.Tensor:
        noise = torch.randn(6, 1, 24, 24, 4, generator=torch.Generator().manual_seed(seed))
        if smooth:  # in-plane 3×3 box blur: less energy in the finest band than in the next one
            noise = F.avg_pool3d(F.pad(noise, (0, 0, 1, 1, 1, 1), mode="circular"), (3, 3, 1), stride=1)
        return noise / noise.std(dim=(1, 2, 3, 4), keepdim=True)

    gate.fit(gate.features(windows(0, True)), gate.features(windows(1, False)))
    assert gate(windows(2, True)).all()
    assert not gate(windows(3, False)).any()
    assert gate(windows(4, True)).shape == (6, 1, 1, 1, 1)


def test_registration_objectives_do_not_fit_misaligned_pairs():
    gen = build_generator("srcnn3d", in_channels=1, out_channels=1, width=4, depth=1, linear_kernel=[3, 3, 3])
    objective = build_objective("reggan", generator=gen, discriminators={}, loss=LossConfig(gan="none"))
    batches = iter([{"image": torch.zeros(1, 1, 8, 8, 8), "target": torch.zeros(1, 1, 8, 8, 8)}])
    assert not objective.fit_linear_paths(batches)
    assert next(batches, None) is not None


def test_training_starts_from_the_fit_and_resume_does_not_refit(tmp_path):
    datalist = write_kernel_datalist(tmp_path / "data")
    overrides = ("model.residual=true", "model.linear_kernel=[5,5,1]", "loss.gan=none", "train.lr=0",
                 "train.linear_fit_batches=2")  # fmt: skip
    last = train(tiny_config(datalist, *overrides, "train.steps=1"), tmp_path / "run")
    weights = load_checkpoint(last)["models"]["generator"]["lin_y.weight"]
    assert weights.abs().sum() > 0  # fitted (lr 0: no gradient step changed it)
    resumed = train(tiny_config(datalist, *overrides, "train.steps=2"), tmp_path / "run", resume=True)
    torch.testing.assert_close(load_checkpoint(resumed)["models"]["generator"]["lin_y.weight"], weights)
    unfitted = train(tiny_config(datalist, *overrides, "train.steps=1", "train.linear_fit_batches=0"),
                     tmp_path / "zero")  # fmt: skip
    assert load_checkpoint(unfitted)["models"]["generator"]["lin_y.weight"].abs().sum() == 0



def test_train_fits_symmetric_paths_on_request(tmp_path):
    datalist = write_kernel_datalist(tmp_path / "data")
    overrides = ("model.residual=true", "model.linear_kernel=[5,5,1]", "loss.gan=none", "train.lr=0",
                 "train.linear_fit_batches=2", "train.steps=1")  # fmt: skip
    fits = {}
    for symmetric in (False, True):
        config = tiny_config(datalist, *overrides, f"train.linear_fit_symmetric={str(symmetric).lower()}")
        fits[symmetric] = load_checkpoint(train(config, tmp_path / str(symmetric)))["models"]["generator"]
    for key in ("lin_y.weight", "lin_x.weight"):
        w = fits[True][key][0, 0, :, :, 0]
        assert w.abs().sum() > 0
        for image in (w.flip(0), w.flip(1), w.T):  # mirror- and x↔y-symmetric
            torch.testing.assert_close(image, w, atol=0, rtol=0)
        assert not torch.equal(fits[False][key][0, 0, :, :, 0].T, fits[False][key][0, 0, :, :, 0])  # free fit


def test_train_on_the_body_region_fits_the_paths_there(tmp_path):
    """``loss.region: body`` reaches the fit end to end: same patches, another least-squares start (in
    the ct-full window, where the air around the body is not clipped and so counts in the whole patch)."""
    datalist = write_kernel_datalist(tmp_path / "data")
    overrides = ("model.residual=true", "model.linear_kernel=[5,5,1]", "loss.gan=none", "train.lr=0",
                 "train.linear_fit_batches=2", "train.steps=1", "data.window=ct-full")  # fmt: skip
    fits = {}
    for region in ("all", "body"):
        last = train(tiny_config(datalist, *overrides, f"loss.region={region}"), tmp_path / region)
        fits[region] = load_checkpoint(last)["models"]["generator"]["lin_y.weight"]
    assert fits["body"].abs().sum() > 0
    assert (fits["body"] - fits["all"]).abs().max() > 1e-3


def test_train_augments_the_patches_on_request(tmp_path):
    """``data.augment`` reaches the training patches end to end: the least-squares start fitted on the
    same (seeded) patches, mirrored and turned, is another filter; without it, the same one."""
    datalist = write_kernel_datalist(tmp_path / "data")
    overrides = ("model.residual=true", "model.linear_kernel=[5,5,1]", "loss.gan=none", "train.lr=0",
                 "train.linear_fit_batches=2", "train.steps=1")  # fmt: skip
    fits = {}
    for name, augment in (("plain", "false"), ("again", "false"), ("augmented", "true")):
        last = train(tiny_config(datalist, *overrides, f"data.augment={augment}"), tmp_path / name)
        fits[name] = load_checkpoint(last)["models"]["generator"]["lin_y.weight"]
    torch.testing.assert_close(fits["again"], fits["plain"], atol=0, rtol=0)
    assert (fits["augmented"] - fits["plain"]).abs().max() > 1e-3


def test_strongest_start_picks_the_classical_filter_that_made_the_target_and_scores_in_the_window():
    """y is scipy's in-plane unsharp mask (σ 0.5, × 4) of x; with the least-squares path spoilt, the
    unsharp mask of the grid wins: the model then reproduces scipy's filter and keeps it as its baseline.
    The reported PSNRs are those of values clipped to the window (by hand with numpy)."""
    rng = np.random.default_rng(0)
    xs = [ndimage.gaussian_filter(rng.normal(size=(16, 16, 3)), (1, 1, 0)) for _ in range(2)]
    ys = [x + 4 * (x - ndimage.gaussian_filter(x, (0.5, 0.5, 0), mode="nearest")) for x in xs]
    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32)[None, None]

    batches = [{"image": tensor(x), "target": tensor(y)} for x, y in zip(xs, ys, strict=True)]
    gen = build_generator("rev_srcnn3d", in_channels=1, out_channels=1, width=4, depth=1, residual=True,
                          linear_kernel=[7, 7, 1])  # fmt: skip
    objective = build_objective("paired", generator=gen, discriminators={}, loss=LossConfig(gan="none"))
    with torch.no_grad():
        gen.lin_y.weight.normal_(0, 0.05)  # a poor start, as a fit far from the window would be
        spoilt = [gen(b["image"])[0, 0].numpy() for b in batches]
    bounds = (-0.3, 0.3)  # clips part of x and y
    chosen = objective.choose_linear_start(batches, bounds)
    name, psnr, fit = chosen["X → Y"]
    assert name == "unsharp mask σ 0.5 × 4"
    clipped = [np.clip(v, *bounds) for v in (*spoilt, *ys)]
    mse = np.mean([(a - b) ** 2 for a, b in zip(clipped[:2], clipped[2:], strict=True)])
    assert fit == pytest.approx(10 * np.log10(0.6**2 / mse), abs=1e-3)
    assert psnr > fit + 40
    with torch.no_grad():
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_allclose(gen(tensor(x))[0, 0].numpy(), y, atol=1e-5)
            np.testing.assert_allclose(gen.lin_y.solved(tensor(x))[0, 0].numpy(), y - x, atol=1e-5)
    # Y → X was not fitted (its path is zero: the input); undoing a sharpening, a blur beats it
    assert chosen["Y → X"][0].startswith("Gaussian blur")


def test_train_starts_from_the_strongest_linear_start_on_request(tmp_path, capsys):
    """End to end: `train.linear_start: strongest` says per direction what it chose; the saved path is that
    classical filter (minus the input) or, where the fit won, the least-squares run's own path."""
    datalist = write_kernel_datalist(tmp_path / "data")
    overrides = ("model.residual=true", "model.linear_kernel=[5,5,1]", "loss.gan=none", "train.lr=0",
                 "train.linear_fit_batches=2", "train.steps=1")  # fmt: skip
    fitted = load_checkpoint(train(tiny_config(datalist, *overrides), tmp_path / "fit"))
    fitted = fitted["models"]["generator"]
    capsys.readouterr()
    last = train(tiny_config(datalist, *overrides, "train.linear_start=strongest"), tmp_path / "strongest")
    weights = load_checkpoint(last)["models"]["generator"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("linear start")]
    assert len(lines) == 2
    grid = {f"Gaussian blur σ {s:g}": (s, None) for s in BLUR_SIGMAS}
    grid.update({f"unsharp mask σ {s:g} × {a:.3g}": (s, a) for s in BLUR_SIGMAS for a in UNSHARP_AMOUNTS})
    grid["the input"] = (None, None)
    for line, key in zip(lines, ("lin_y.weight", "lin_x.weight"), strict=True):
        name = line.split(": ", 1)[1].split(" (")[0]
        if name == "least squares":
            torch.testing.assert_close(weights[key], fitted[key])
        else:
            expected = classical_filter((5, 5, 1), *grid[name]) - classical_filter((5, 5, 1))
            torch.testing.assert_close(weights[key][0, 0].double(), expected, atol=1e-6, rtol=0)
    assert any("least squares" not in line.split(" (")[0] for line in lines)  # the window decided somewhere
