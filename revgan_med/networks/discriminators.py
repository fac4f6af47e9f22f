"""Discriminators by name: the 3D PatchGAN of thesis ``000_*`` §4.2, from MONAI's convolution blocks.

The layers are MONAI's `PatchDiscriminator` (the pix2pix/CycleGAN "basic" PatchGAN the thesis uses): a
4³ conv with stride 2 and LeakyReLU(0.2) without normalisation, then layers doubling the channels (two
with stride 2, one with stride 1), each conv – norm – LeakyReLU(0.2), and a final 4³ conv to one channel;
the receptive field is 70³. MONAI's class strides every axis alike, so a thin slab (64×64×8, 20 slices)
shrinks to nothing along its short axis; built for a training patch, ours keeps stride 2 along an axis
only while that axis is still ≥ 6 voxels and uses a stride-1 3-voxel kernel there otherwise (as
anisotropic nnU-Net plans do). For patches of ≥ 24 voxels per side the layers, parameter names and shapes
are MONAI's, so its weights load. Instance normalisation with biases (the reference's setting for
batch size 1); the logits are returned (the loss applies the sigmoid, or none for LSGAN).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import Convolution
from monai.networks.utils import normal_init
from torch import Tensor, nn

from revgan_med.config import patch_problem
from revgan_med.registry import Registry

DISCRIMINATORS = Registry("discriminator")
_DOWN, _FLAT = (4, 2, 1), (3, 1, 1)  # (kernel, stride, padding) of a halving / size-keeping layer
_STRIDES = (2, 2, 2, 1, 1)  # thesis layers: initial, three conv–norm–act, final


def discriminator_names() -> list[str]:
    """Names accepted by `build_discriminator`."""
    return DISCRIMINATORS.names()


def build_discriminator(
    name: str = "patchgan3d", *, in_channels: int, width: int, patch_size: Sequence[int] | None = None
) -> nn.Module:
    """Build the discriminator `name`; its forward maps ``(B, C, D, H, W)`` to logits ``(B, 1, d, h, w)``.

    Args:
        in_channels: image channels it judges.
        width: channels of the first layer (doubled by each following layer).
        patch_size: the training patch (D, H, W) it is built for; None: the thesis layout (sides >= 24).
    """
    for arg, value in (("in_channels", in_channels), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"discriminator {name!r}: {arg} must be an integer >= 1, got {value!r}")
    if patch_size is not None and (problem := patch_problem(patch_size)):
        raise ValueError(f"discriminator {name!r}: {problem}")
    return DISCRIMINATORS.build(name, in_channels=in_channels, width=width, patch_size=patch_size)


def _layout(side: int | None) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of the five layers along an axis of `side` voxels (None: large)."""
    layers = []
    for stride in _STRIDES:
        if stride == 1:
            layers.append((4, 1, 1))
        elif side is None or side >= 6:
            layers.append(_DOWN)
            side = None if side is None else side // 2
        else:
            layers.append(_FLAT)
    return layers


def _out_size(side: int, layers: Sequence[tuple[int, int, int]]) -> int:
    for kernel, stride, padding in layers:
        side = (side + 2 * padding - kernel) // stride + 1
    return side


class PatchGAN3d(nn.Module):
    """3D PatchGAN (70³ receptive field along fully strided axes) returning logits ``(B, 1, d, h, w)``.

    `min_sides` is the smallest input per axis: the stride-1 normalised layer must keep ≥ 2 voxels.
    """

    def __init__(self, *, in_channels: int, width: int, patch_size: Sequence[int] | None = None) -> None:
        super().__init__()
        axes = [_layout(None if patch_size is None else int(n)) for n in (patch_size or (None,) * 3)]
        per_layer = [tuple(zip(*(axis[i] for axis in axes), strict=True)) for i in range(len(_STRIDES))]
        self.min_sides = tuple(next(n for n in range(1, 65) if _out_size(n, axis[:4]) >= 2) for axis in axes)
        act = ("leakyrelu", {"negative_slope": 0.2})
        channels = [in_channels, width, 2 * width, 4 * width, 8 * width, 1]
        # the names MONAI's PatchDiscriminator gives its blocks, so state dicts stay interchangeable
        names = ["initial_conv", "0", "1", "2", "final_conv"]
        self.net = nn.Sequential()
        for i, (name, (kernel, stride, padding)) in enumerate(zip(names, per_layer, strict=True)):
            last = name == "final_conv"
            self.net.add_module(name, Convolution(
                spatial_dims=3, in_channels=channels[i], out_channels=channels[i + 1], strides=stride,
                kernel_size=kernel, padding=padding, act=None if last else act, bias=True, conv_only=last,
                norm=None if name == "initial_conv" or last else "INSTANCE", dropout=0.0,
            ))  # fmt: skip
        self.net.apply(normal_init)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or any(n < m for n, m in zip(x.shape[2:], self.min_sides, strict=True)):
            raise ValueError(
                f"patchgan3d built for sides >= {list(self.min_sides)} got {tuple(x.shape)} (B, C, D, H, W)"
            )
        return self.net(x)


@DISCRIMINATORS.register("patchgan3d")
def patchgan3d(*, in_channels: int, width: int, patch_size: Sequence[int] | None = None) -> PatchGAN3d:
    """The thesis §4.2 3D PatchGAN, adapted to the short axes of `patch_size`."""
    return PatchGAN3d(in_channels=in_channels, width=width, patch_size=patch_size)
