"""The 3D PatchGAN: one logits tensor, the thesis §4.2 / pix2pix "basic" layer structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from revgan_med.networks import build_discriminator, discriminator_names


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
    with pytest.raises(ValueError, match=">= 24"):
        build_discriminator(in_channels=1, width=4)(torch.randn(1, 1, 16, 32, 32))
