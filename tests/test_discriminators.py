"""The 3D PatchGAN: one logits tensor, the thesis §4.2 / pix2pix "basic" layer structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from revgan_med.networks import build_discriminator, discriminator_names
from revgan_med.networks.discriminators import PatchGAN3d


def conv_out(n: int, stride: int) -> int:
    return (n + 2 * 1 - 4) // stride + 1  # 4³ kernel, padding 1


@pytest.mark.parametrize("name", discriminator_names())
@pytest.mark.parametrize("shape", [(2, 1, 32, 32, 32), (1, 6, 24, 40, 33)])
def test_output_is_one_logits_tensor(name, shape):
    disc = build_discriminator(name, in_channels=shape[1], width=4)
    with torch.no_grad():
        out = disc(torch.randn(shape))
    expected = []
    for n in shape[2:]:
        for stride in (2, 2, 2, 1, 1):
            n = conv_out(n, stride)
        expected.append(n)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (shape[0], 1, *expected)


def test_patchgan_layers_follow_the_thesis():
    disc = build_discriminator(in_channels=1, width=8)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv3d)]
    assert [c.kernel_size for c in convs] == [(4, 4, 4)] * 5
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    slopes = [m.negative_slope for m in disc.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2] * 4
    norms = [m for m in disc.modules() if isinstance(m, (nn.InstanceNorm3d, nn.BatchNorm3d))]
    assert len(norms) == 3 and all(isinstance(n, nn.InstanceNorm3d) for n in norms)
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.02) < 0.002


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid: patchgan3d"):
        build_discriminator("nlayer", in_channels=1, width=4)
    with pytest.raises(ValueError, match="width must be an integer"):
        build_discriminator(in_channels=1, width=0)
    with pytest.raises(ValueError, match=r"sides >= \[24, 24, 24\]"):
        build_discriminator(in_channels=1, width=4)(torch.randn(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="patch sides >= 8"):
        build_discriminator(in_channels=1, width=4, patch_size=[64, 64, 6])


def test_large_patches_keep_monai_patchdiscriminator_weights_and_outputs():
    from monai.networks.nets import PatchDiscriminator

    monai = PatchDiscriminator(spatial_dims=3, channels=4, in_channels=2, out_channels=1, num_layers_d=3,
                               kernel_size=4, norm="INSTANCE", bias=True, padding=1)  # fmt: skip
    ours = build_discriminator(in_channels=2, width=4, patch_size=[24, 40, 32])
    ours.net.load_state_dict(monai.state_dict())  # same names and shapes
    x = torch.randn(1, 2, 24, 40, 32)
    torch.testing.assert_close(ours(x), monai(x)[-1])


@pytest.mark.parametrize(("patch", "strided"), [((64, 64, 8), (3, 3, 1)), ((16, 16, 8), (2, 2, 1))])
def test_thin_patches_stride_only_long_axes_and_train(patch, strided):
    disc = build_discriminator(in_channels=2, width=4, patch_size=patch)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv3d)]
    # stride-2 layers per axis: halving stops once an axis is below 6 voxels (8 → 4, 16 → 8 → 4)
    assert tuple(sum(c.stride[a] == 2 for c in convs) for a in range(3)) == strided
    x = torch.randn(2, 2, *patch, requires_grad=True)
    out = disc(x)
    assert out.shape[:2] == (2, 1) and min(out.shape[2:]) >= 1
    out.square().mean().backward()
    grads = [p.grad for p in disc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g, p in zip(grads, disc.parameters(), strict=True) if p.ndim > 1)
    assert x.grad.abs().sum() > 0


def test_min_sides_follow_the_layout():
    assert PatchGAN3d(in_channels=1, width=2).min_sides == (24, 24, 24)  # the thesis layout
    disc = PatchGAN3d(in_channels=1, width=2, patch_size=(20, 9, 8))
    for axis, side in enumerate(disc.min_sides):  # the smallest side that runs, on every axis
        shape = [30, 30, 30]
        shape[axis] = side
        disc(torch.randn(1, 1, *shape))
        shape[axis] = side - 1
        with pytest.raises(ValueError, match="built for sides"):
            disc(torch.randn(1, 1, *shape))
