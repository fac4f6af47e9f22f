"""Every registered generator: shapes, initialisation, shared core, invertibility and memory parity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from revgan_med.networks import ReversibleSequence, build_generator, generator_names, init_weights
from revgan_med.networks.generators import GENERATORS, Branch
from revgan_med.networks.linear import LinearPath

NAMES = generator_names()
# constructor options every registered generator takes; each test below runs with and without them
OPTIONS = [{}, {"linear_kernel": [3, 3, 1]}]
REVERSIBLE = [n for n in NAMES if isinstance(build_generator(n, in_channels=1, out_channels=1, width=4,
                                                             depth=1).core, ReversibleSequence)]


def build(name: str, memory_saving: bool = True, depth: int = 2, **kw) -> nn.Module:
    torch.manual_seed(0)
    args = {"in_channels": 1, "out_channels": 2, "width": 4, "depth": depth, **kw}
    return build_generator(name, memory_saving=memory_saving, **args)


def test_registry_lists_the_thesis_models():
    assert set(NAMES) >= {"rev_srcnn3d", "rev_resnet3d", "srcnn3d", "resnet3d"}
    assert set(REVERSIBLE) >= {"rev_srcnn3d", "rev_resnet3d"}
    with pytest.raises(ValueError, match="valid: .*rev_srcnn3d"):
        build_generator("unet", in_channels=1, out_channels=1, width=4, depth=1)
    with pytest.raises(ValueError, match="width must be even"):
        build_generator("rev_srcnn3d", in_channels=1, out_channels=1, width=5, depth=1)
    with pytest.raises(ValueError, match="depth must be an integer >= 0"):
        build_generator("rev_srcnn3d", in_channels=1, out_channels=1, width=4, depth=-1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(8, 8, 8), (7, 9, 5), (1, 3, 2)])
@pytest.mark.parametrize("options", OPTIONS)
def test_shapes_any_size(name, size, options):
    model = build(name, **options)
    with torch.no_grad():
        assert model(torch.randn(2, 1, *size)).shape == (2, 2, *size)
        assert model.inverse(torch.randn(1, 2, *size)).shape == (1, 1, *size)
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        model(torch.randn(1, 8, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_initialisation(name):
    model = build(name, width=8, depth=3)
    branches = [m for m in model.modules() if isinstance(m, Branch)]
    assert branches and all(not b[-1].weight.any() and not b[-1].bias.any() for b in branches)
    last = {id(b[-1]) for b in branches}
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    others = [m for m in convs if id(m) not in last]
    weights = torch.cat([m.weight.flatten() for m in others])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002


@pytest.mark.parametrize("name", REVERSIBLE)
def test_reversible_core_starts_as_identity_and_inverts_with_random_weights(name):
    model = build(name, width=8, depth=4)
    channels = model.core.blocks[0].f[0].in_channels * 2
    z = torch.randn(1, channels, 6, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model.core(z), z)  # zero-initialised last convs
        init_weights(model, zero_last=False)
        y = model.core(z)
        assert (y - z).abs().max() > 1e-2
        assert (model.core.inverse(y) - z).abs().max() < 1e-4


@pytest.mark.parametrize("name", REVERSIBLE)
def test_one_core_serves_both_directions(name):
    model = build(name)
    init_weights(model, zero_last=False)
    model.inverse(torch.randn(1, 2, 6, 6, 6)).square().sum().backward()
    core_grads = [p.grad for p in model.core.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in core_grads)
    assert all(p.grad is None for p in [*model.enc_x.parameters(), *model.dec_y.parameters()])
    core_params = sum(p.numel() for p in model.core.parameters())
    half = model.core.blocks[0].f[0].in_channels
    assert core_params == 2 * 2 * 2 * (half * half * 27 + half)  # depth · (f, g) · 2 convs


def test_baselines_have_separate_weights_per_direction():
    model = build("srcnn3d", depth=1)
    k = 4
    assert sum(p.numel() for p in model.core.parameters()) == 2 * 2 * (k * k * 27 + k)
    model.inverse(torch.randn(1, 2, 6, 6, 6)).square().sum().backward()
    assert all(p.grad is None for p in model.core.xy.parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("options", OPTIONS)
def test_memory_saving_matches_plain(name, direction, options):
    saving, plain = build(name, True, depth=3, **options), build(name, False, depth=3, **options)
    init_weights(saving, zero_last=False)  # the linear paths get random weights too
    plain.load_state_dict(saving.state_dict())
    x = torch.randn(1, 1 if direction == "forward" else 2, 7, 8, 6)
    out = []
    for model in (saving, plain):
        leaf = x.clone().requires_grad_()
        y = getattr(model, direction)(leaf)
        y.square().sum().backward()
        params = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        out.append((y.detach(), leaf.grad, torch.cat(params)))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-6, rtol=0)
    for a, b in zip(out[0][1:], out[1][1:], strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.parametrize("name", REVERSIBLE)
def test_channels_last_weights_compute_the_same_step_and_load_into_a_plain_model(name):
    """CPU training keeps 5-D weights channels-last (faster oneDNN backward); that must not change the
    step, and its state dict must load into a freshly built (contiguous) model, as inference does."""
    contiguous = build(name, True, depth=2, residual=False)
    init_weights(contiguous, zero_last=False)
    last = build(name, True, depth=2, residual=False).to(memory_format=torch.channels_last_3d)
    last.load_state_dict(contiguous.state_dict())
    assert any(p.dim() == 5 and not p.is_contiguous() for p in last.parameters())
    x = torch.randn(2, 1, 12, 12, 12)
    out = []
    for model in (contiguous, last):
        y = model(x)
        y.square().sum().backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        out.append((y.detach(), torch.cat(grads)))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5)
    assert ((out[1][1] - out[0][1]).norm() / out[0][1].norm()).item() < 1e-4
    fresh = build(name, True, depth=2, residual=False)
    fresh.load_state_dict(last.state_dict())
    torch.testing.assert_close(fresh(x), out[0][0], atol=1e-5, rtol=1e-5)


def test_rev_resnet3d_output_in_tanh_range():
    model = build("rev_resnet3d")
    init_weights(model, std=1.0)
    with torch.no_grad():
        y = model(torch.randn(1, 1, 8, 8, 8) * 10)
    assert y.abs().max() <= 1.0 and y.abs().max() > 0.9


@pytest.mark.parametrize("name", NAMES)
def test_residual_generator_starts_as_identity_and_learns_a_correction(name):
    torch.manual_seed(0)
    gen = build_generator(name, in_channels=2, out_channels=2, width=4, depth=2, residual=True)
    x = torch.randn(1, 2, 9, 8, 7)
    assert torch.equal(gen(x), x)
    assert torch.equal(gen.inverse(x), x)
    # one gradient step towards a shifted target moves the output off the identity
    opt = torch.optim.SGD(gen.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        (gen(x) - (x + 0.5)).abs().mean().backward()
        opt.step()
    assert (gen(x) - x).abs().mean() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_options_are_constructor_arguments_of_every_registered_factory(name):
    model = GENERATORS.build(name, in_channels=1, out_channels=2, width=4, depth=1, residual=False,
                             linear_kernel=[5, 3, 1])  # fmt: skip
    assert isinstance(model.lin_y, LinearPath) and isinstance(model.lin_x, LinearPath)
    assert model.lin_y.weight.shape == (2, 1, 5, 3, 1) and model.lin_x.weight.shape == (1, 2, 5, 3, 1)
    plain = GENERATORS.build(name, in_channels=2, out_channels=2, width=4, depth=1, residual=True)
    assert plain.residual and plain.lin_x is None and plain.lin_y is None
    x = torch.randn(1, 2, 6, 6, 6)
    with torch.no_grad():  # residual: the input plus the network's (here untrained, random) correction
        torch.testing.assert_close(plain(x) - x, plain.dec_y(plain.core(plain.enc_x(x))))


def test_residual_needs_matching_channels():
    with pytest.raises(ValueError, match="residual"):
        build_generator("rev_srcnn3d", in_channels=1, out_channels=6, width=4, depth=1, residual=True)
