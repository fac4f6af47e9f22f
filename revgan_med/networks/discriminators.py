"""Discriminators by name: the 3D PatchGAN of thesis ``000_*`` §4.2, built on MONAI's `PatchDiscriminator`.

MONAI's network is exactly the pix2pix/CycleGAN "basic" PatchGAN the thesis uses: a 4³ conv with stride 2
and LeakyReLU(0.2) without normalisation, then layers doubling the channels (two with stride 2, one with
stride 1), each conv – norm – LeakyReLU(0.2), and a final 4³ conv to one channel; the receptive field is
70³. We choose instance normalisation with biases (the reference's setting for batch size 1) and return
the logits (the loss applies the sigmoid, or none for LSGAN).
"""

from __future__ import annotations

from monai.networks.nets import PatchDiscriminator
from torch import Tensor, nn

from revgan_med.registry import Registry

DISCRIMINATORS = Registry("discriminator")


def discriminator_names() -> list[str]:
    """Names accepted by `build_discriminator`."""
    return DISCRIMINATORS.names()


def build_discriminator(name: str = "patchgan3d", *, in_channels: int, width: int) -> nn.Module:
    """Build the discriminator `name`; its forward maps ``(B, C, D, H, W)`` to logits ``(B, 1, d, h, w)``.

    Args:
        in_channels: image channels it judges.
        width: channels of the first layer (doubled by each following layer).
    """
    for arg, value in (("in_channels", in_channels), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"discriminator {name!r}: {arg} must be an integer >= 1, got {value!r}")
    return DISCRIMINATORS.build(name, in_channels=in_channels, width=width)


class PatchGAN3d(nn.Module):
    """3D PatchGAN (70³ receptive field) returning one logits tensor ``(B, 1, d, h, w)``.

    Each spatial side must be at least 24 voxels: with fewer, the stride-1 layer sees a single voxel and
    instance normalisation is undefined.
    """

    def __init__(self, *, in_channels: int, width: int) -> None:
        super().__init__()
        self.net = PatchDiscriminator(
            spatial_dims=3, channels=width, in_channels=in_channels, out_channels=1, num_layers_d=3,
            kernel_size=4, norm="INSTANCE", bias=True, padding=1,
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or min(x.shape[2:]) < 24:
            raise ValueError(f"patchgan3d needs (B, C, D, H, W) with every side >= 24, got {tuple(x.shape)}")
        return self.net(x)[-1]  # MONAI returns every layer's features; the last one is the logits


@DISCRIMINATORS.register("patchgan3d")
def patchgan3d(*, in_channels: int, width: int) -> PatchGAN3d:
    """The thesis §4.2 3D PatchGAN."""
    return PatchGAN3d(in_channels=in_channels, width=width)
