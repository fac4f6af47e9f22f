"""The registration network R of RegGAN (``004_*``, Kong et al. 2021) in 3D, plus warping and smoothness.

R takes the generator output and the (possibly misaligned) target, ``(F(x), y)``, and predicts a dense
displacement field T of shape ``(B, 3, X, Y, Z)`` in voxels, such that ``F(x) ∘ T`` (F(x) resampled at
``p + T(p)``) is aligned with y. The network is MONAI's `LocalNet` (a 3D registration U-Net from
DeepReg) with a zero-initialised output layer, so training starts from the identity transform; warping is
MONAI's `Warp` and the smoothness term uses MONAI's `DiffusionLoss`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from monai.losses import DiffusionLoss
from monai.networks.blocks import Warp
from monai.networks.nets import LocalNet
from torch import nn

from revgan_med.runtime import float32_island

__all__ = ["RegistrationNet", "smoothness_loss", "warp"]


class RegistrationNet(nn.Module):
    """3D registration network: ``forward(moving, fixed) -> T`` with T ``(B, 3, X, Y, Z)`` in voxels.

    Args:
        in_channels: channels of ONE image (moving and fixed are concatenated: the network sees twice).
        width: channels of the first level (doubled at each coarser level).
        levels: number of down-sampling levels; the field is the mean of the predictions at every level
            (coarse levels give the smooth, large displacements, level 0 the fine ones).

    Inputs of any spatial size are accepted: they are padded (edge values) to a multiple of ``2**levels``
    and the field is cropped back. The last layer is zero-initialised, so T = 0 at the start.
    """

    def __init__(self, *, in_channels: int = 1, width: int = 16, levels: int = 3) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = levels
        self.net = LocalNet(
            spatial_dims=3,
            in_channels=2 * in_channels,
            num_channel_initial=width,
            extract_levels=tuple(range(levels + 1)),
            out_kernel_initializer="zeros",
            out_channels=3,
        )

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Field ``(B, 3, X, Y, Z)`` in voxels warping `moving` onto `fixed` (both ``(B, C, X, Y, Z)``)."""
        if moving.shape != fixed.shape or moving.ndim != 5:
            raise ValueError(
                f"moving and fixed must be equal (B, C, X, Y, Z) tensors, got {tuple(moving.shape)} "
                f"and {tuple(fixed.shape)}"
            )
        size = moving.shape[2:]
        multiple = 2**self.levels
        pad = [0, 0] * 3
        for i, n in enumerate(size):
            pad[2 * (2 - i) + 1] = -n % multiple  # F.pad lists the last dimension first
        pair = torch.cat([moving, fixed], dim=1)
        if any(pad):
            pair = F.pad(pair, pad, mode="replicate")
        field = self.net(pair)
        return field[:, :, : size[0], : size[1], : size[2]]


class _Float32Warp(Warp):
    """MONAI `Warp` whose cached reference grid follows the field's device and is always float32.

    MONAI caches the grid by shape only, in the dtype and on the device of the first field it saw: a
    bf16 grid holds coordinates 64–127 to 0.5 voxel, and a grid cached on one device breaks the next.
    """

    def get_reference_grid(self, ddf: torch.Tensor, jitter: bool = False, seed: int = 0) -> torch.Tensor:
        grid = self.ref_grid
        if grid is not None and (grid.device != ddf.device or grid.dtype != ddf.dtype):
            self.ref_grid = None
        return super().get_reference_grid(ddf, jitter=jitter, seed=seed)


with warnings.catch_warnings():  # MONAI announces that it uses torch's grid_sample: expected, not a problem
    warnings.simplefilter("ignore", UserWarning)
    _WARP = _Float32Warp(mode="bilinear", padding_mode="border")


def warp(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Resample `image` ``(B, C, X, Y, Z)`` at ``p + field(p)``; `field` ``(B, 3, X, Y, Z)`` in voxels.

    Trilinear, with border values outside the volume; differentiable in both arguments. Grid and
    sampling run in float32 whatever the autocast state (sub-voxel shifts need the mantissa); the
    result is float32.
    """
    with float32_island(field.device.type):
        return _WARP(image.float(), field.float())


_DIFFUSION = DiffusionLoss(normalize=False, reduction="mean")


def smoothness_loss(field: torch.Tensor) -> torch.Tensor:
    """Mean squared spatial gradient of a displacement field ``(B, 3, X, Y, Z)`` (RegGAN's Smooth term).

    Central differences on the interior voxels (MONAI `DiffusionLoss`, which sums the three directions),
    divided by 3 so the value is the mean over components, directions and voxels as in RegGAN. A
    constant field gives exactly 0; a linear field ``T_c(p) = sum_d A[c, d] p_d`` gives
    ``sum(A**2) / 9``.
    """
    return _DIFFUSION(field) / (field.ndim - 2)
