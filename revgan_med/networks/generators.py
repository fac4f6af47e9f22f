"""RevGAN generators (thesis ``000_*`` §3, §4.1) and their non-reversible baselines, by name.

Every generator maps X → Y with `forward` and Y → X with `inverse`:
``F = Dec_Y ∘ core ∘ Enc_X`` and ``G = Dec_X ∘ core⁻¹ ∘ Enc_Y``. The reversible generators share ONE
core of additive-coupling blocks between the directions; the baselines (`srcnn3d`, `resnet3d`) use the
same encoders/decoders with ordinary residual blocks and separate weights per direction, as a CycleGAN
generator pair. Layers are plain ``torch.nn``: MONAI's `Convolution` has no reflection padding, which the
thesis uses throughout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.utils import normal_init
from torch import Tensor, nn

from revgan_med.networks.coupling import AdditiveCoupling, ReversibleSequence
from revgan_med.networks.linear import LinearPath
from revgan_med.registry import Registry
from revgan_med.runtime import float32_island

GENERATORS = Registry("generator")


def generator_names() -> list[str]:
    """Names accepted by `build_generator`."""
    return GENERATORS.names()


def build_generator(
    name: str, *, in_channels: int, out_channels: int, width: int, depth: int, memory_saving: bool = True,
    residual: bool = False, linear_kernel: Sequence[int] | None = None,
) -> Generator:
    """Build the generator `name` (see `generator_names()`), initialised as in thesis §4.3.

    Args:
        in_channels: image channels of domain X (input of `forward`).
        out_channels: image channels of domain Y (output of `forward`, input of `inverse`).
        width: feature channels K (even: the coupling splits them in halves).
        depth: residual / reversible blocks in the core (R).
        memory_saving: reversible cores recompute activations in backward; no effect on the baselines.
        residual: add the input to the output (``F(x) = x + Dec_Y(C(Enc_X(x)))``, likewise `inverse`),
            with the decoders' last convs zero-initialised so the generator starts as the identity. Not in
            the thesis: for super-resolution and kernel conversion the output is the input plus a small
            correction, and learning that correction converges far faster than learning the identity.
        linear_kernel: odd kernel size (x, y, z) of a `LinearPath` per direction, added to the output
            (None: none). Not in the thesis: a reconstruction kernel is close to a linear in-plane
            filter, which the normalised network approximates poorly but least squares fits exactly.
            With `residual`, the network's correction on top of input and filter is multiplied by a
            learned scalar `gate` that starts at 0 (the decoders' last convs keep their random
            weights instead): the untrained model is the fitted filter, and the correction grows only
            as fast as Adam moves one number. A zero-initialised last conv does not do this: Adam moves
            each of its weights by ~lr in the first steps, and over the ResNet decoder's 5³·K inputs
            of unit-variance (InstanceNorm) features that sum is ~0.4 in normalised units (~800 HU in
            the ct-full window) per step, which threw the model far below its fitted start.
    """
    for arg, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                            ("width", width, 2), ("depth", depth, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"generator {name!r}: {arg} must be an integer >= {low}, got {value!r}")
    if width % 2:
        raise ValueError(f"generator {name!r}: width must be even (split into two halves), got {width}")
    if residual and in_channels != out_channels:
        raise ValueError(f"generator {name!r}: residual needs in_channels == out_channels, "
                         f"got {in_channels} and {out_channels}")
    model = GENERATORS.build(
        name, in_channels=in_channels, out_channels=out_channels, width=width, depth=depth,
        memory_saving=memory_saving, residual=residual, linear_kernel=linear_kernel,
    )
    init_weights(model)
    gated = residual and linear_kernel is not None
    if gated:
        model.gate = nn.Parameter(torch.zeros(()))
        model.baseline_only = torch.zeros(2, dtype=torch.bool)
    elif residual:
        for dec in (model.dec_x, model.dec_y):
            last = [m for m in dec.modules() if isinstance(m, nn.Conv3d)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
    for path in (model.lin_x, model.lin_y) if linear_kernel is not None else ():
        path.reset_parameters()
    return model


class Branch(nn.Sequential):
    """NN₁/NN₂ of thesis Fig. 7: conv 3³ – InstanceNorm – ReLU – conv 3³, reflection padding.

    The last convolution is zero-initialised (`init_weights`), so a block starts as the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(
            _conv(channels, channels, 3),
            nn.InstanceNorm3d(channels),
            nn.ReLU(inplace=True),
            _conv(channels, channels, 3),
        )


class ResidualBlock(nn.Module):
    """Ordinary residual block ``x + Branch(x)`` on all K channels (the baselines' core)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = Branch(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class SeparateCores(nn.Module):
    """Two independent residual stacks: `forward` for X → Y, `inverse` for Y → X (a CycleGAN pair)."""

    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.xy = nn.Sequential(*(ResidualBlock(channels) for _ in range(depth)))
        self.yx = nn.Sequential(*(ResidualBlock(channels) for _ in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.xy(x)

    def inverse(self, y: Tensor) -> Tensor:
        return self.yx(y)


class Generator(nn.Module):
    """``forward = dec_y ∘ core ∘ enc_x`` (X → Y), ``inverse = dec_x ∘ core.inverse ∘ enc_y`` (Y → X).

    Inputs ``(B, C, D, H, W)`` of any spatial size: they are padded (replicate, at the far end) to a multiple
    of `multiple` for strided encoders and to at least `min_size` for the reflection padding, and the
    output is cropped back to the input size. With `residual` the input is added to the output; with
    linear paths (`lin_y` for X → Y, `lin_x` for Y → X) their filtered input is added too.
    """

    def __init__(
        self, *, enc_x: nn.Module, enc_y: nn.Module, core: nn.Module, dec_x: nn.Module, dec_y: nn.Module,
        multiple: int = 1, min_size: int = 1, residual: bool = False, lin_x: LinearPath | None = None,
        lin_y: LinearPath | None = None,
    ) -> None:
        super().__init__()
        self.enc_x, self.enc_y, self.core, self.dec_x, self.dec_y = enc_x, enc_y, core, dec_x, dec_y
        self.multiple, self.min_size, self.residual = multiple, min_size, residual
        self.lin_y, self.lin_x = lin_y, lin_x  # registered in this order, as checkpoints list them
        self.gate: nn.Parameter | None = None  # scales the network's correction (see `build_generator`)
        # with a gate: (forward, inverse) directions that are exactly their solved linear filter (correction
        # off, `LinearPath.solved`); set in a best.pt for a direction whose model was below that filter
        self.register_buffer("baseline_only", None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        if self.gate is not None and prefix + "gate" not in state_dict:
            state_dict[prefix + "gate"] = torch.ones(())  # saved before the gate: its correction was ungated
        if self.baseline_only is not None and prefix + "baseline_only" not in state_dict:
            state_dict[prefix + "baseline_only"] = torch.zeros(2, dtype=torch.bool)  # saved before the switch
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self._combine(x, self._translate(x, self.enc_x, self.core.forward, self.dec_y), inverse=False)

    def inverse(self, y: Tensor) -> Tensor:
        return self._combine(y, self._translate(y, self.enc_y, self.core.inverse, self.dec_x), inverse=True)

    def _combine(self, v: Tensor, body: Tensor, *, inverse: bool) -> Tensor:
        """Body output (times the `gate`, where there is one) plus the input (`residual`) and the linear
        path, these in true float32: under autocast only the learned body runs in low precision
        (`revgan_med.runtime`)."""
        with float32_island(v.device.type):
            v, body = v.float(), body.float()
            if self.gate is not None:
                body = self.gate.float() * body
            linear = self.linear_part(v, inverse=inverse)
            if self.baseline_only is not None:  # tensor arithmetic rather than `if`, so traces keep it
                off = self.baseline_only[int(inverse)].float()
                path = self.lin_x if inverse else self.lin_y
                body, linear = (1 - off) * body, (1 - off) * linear + off * path.solved(v)
            out = body + v if self.residual else body
            return out + linear

    def receptive_radius(self) -> int:
        """Input voxels on each side that one output voxel of `forward` sees through the convolutions
        (InstanceNorm aside, whose statistics span the whole window): the margin a tiled prediction
        needs around each target window to equal the whole-volume one away from its statistics."""
        core = self.core.xy if isinstance(self.core, SeparateCores) else self.core
        paths = [self.lin_y] if self.lin_y is not None else []
        radius, scale = 0.0, 1.0
        for module in (m for part in (self.enc_x, core, self.dec_y) for m in part.modules()):
            if isinstance(module, nn.ConvTranspose3d):
                scale /= module.stride[0]
                radius += (max(module.kernel_size) - 1) / 2 * scale
            elif isinstance(module, nn.Conv3d):
                radius += (max(module.kernel_size) - 1) / 2 * scale
                scale *= module.stride[0]
        lin = max((max(p.kernel_size) - 1) // 2 for p in paths) if paths else 0
        return max(math.ceil(radius), lin) + self.multiple - 1

    def linear_part(self, v: Tensor, *, inverse: bool) -> Tensor | float:
        """What the linear path adds to the output of a direction (0 without paths)."""
        path = self.lin_x if inverse else self.lin_y
        return 0.0 if path is None else path(v)

    def _translate(
        self, v: Tensor, enc: nn.Module, core: Callable[[Tensor], Tensor], dec: nn.Module
    ) -> Tensor:
        if v.ndim != 5:
            raise ValueError(f"generator input must be (B, C, D, H, W), got shape {tuple(v.shape)}")
        size = v.shape[2:]
        pad = [max(s + (-s) % self.multiple, self.min_size) - s for s in size]
        padded = F.pad(v, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate") if any(pad) else v
        return dec(core(enc(padded)))[..., : size[0], : size[1], : size[2]]


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, padding_mode="reflect")


def _reversible_core(channels: int, depth: int, memory_saving: bool) -> ReversibleSequence:
    half = channels // 2
    blocks = (AdditiveCoupling(Branch(half), Branch(half)) for _ in range(depth))
    return ReversibleSequence(blocks, memory_saving=memory_saving)


def _srcnn_parts(cin: int, cout: int, k: int) -> tuple[nn.Module, nn.Module]:
    """Thesis §4.1 SRCNN: encoder conv 3³ → K, IN, ReLU; decoder 1³ projection to the image channels."""
    return nn.Sequential(_conv(cin, k, 3), nn.InstanceNorm3d(k), nn.ReLU(inplace=True)), nn.Conv3d(k, cout, 1)


def _resnet_parts(cin: int, cout: int, k: int) -> tuple[nn.Module, nn.Module]:
    """Thesis §4.1 3D ResNet: conv 5³ → K, IN, ReLU, conv 3³ stride 2 → 2K, IN, ReLU; decoder mirrors it."""
    enc = nn.Sequential(
        _conv(cin, k, 5), nn.InstanceNorm3d(k), nn.ReLU(inplace=True),
        _conv(k, 2 * k, 3, stride=2), nn.InstanceNorm3d(2 * k), nn.ReLU(inplace=True),
    )
    dec = nn.Sequential(
        nn.ConvTranspose3d(2 * k, k, 3, stride=2, padding=1, output_padding=1),
        nn.InstanceNorm3d(k), nn.ReLU(inplace=True), _conv(k, cout, 5), nn.Tanh(),
    )
    return enc, dec


def _assemble(parts: Callable[[int, int, int], tuple[nn.Module, nn.Module]], core: nn.Module, *,
              in_channels: int, out_channels: int, width: int, multiple: int, residual: bool,
              linear_kernel: Sequence[int] | None) -> Generator:
    enc_x, dec_y = parts(in_channels, out_channels, width)
    enc_y, dec_x = parts(out_channels, in_channels, width)
    paths = {}
    if linear_kernel is not None:
        paths = {"lin_y": LinearPath(in_channels, out_channels, linear_kernel),
                 "lin_x": LinearPath(out_channels, in_channels, linear_kernel)}
    # reflection padding needs a side > pad: 2 for 3³ convs; 4 for the ResNet (5³ convs, 3³ at half size)
    return Generator(enc_x=enc_x, enc_y=enc_y, core=core, dec_x=dec_x, dec_y=dec_y, multiple=multiple,
                     min_size=2 * multiple, residual=residual, **paths)


@GENERATORS.register("rev_srcnn3d")
def rev_srcnn3d(*, in_channels: int, out_channels: int, width: int, depth: int,
                memory_saving: bool = True, residual: bool = False,
                linear_kernel: Sequence[int] | None = None) -> Generator:
    """Reversible 3D SRCNN: full-resolution core of `depth` coupling blocks on `width` channels."""
    core = _reversible_core(width, depth, memory_saving)
    return _assemble(_srcnn_parts, core, in_channels=in_channels, out_channels=out_channels, width=width,
                     multiple=1, residual=residual, linear_kernel=linear_kernel)


@GENERATORS.register("rev_resnet3d")
def rev_resnet3d(*, in_channels: int, out_channels: int, width: int, depth: int,
                 memory_saving: bool = True, residual: bool = False,
                linear_kernel: Sequence[int] | None = None) -> Generator:
    """Reversible 3D ResNet: core of `depth` coupling blocks on 2·`width` channels at half resolution."""
    core = _reversible_core(2 * width, depth, memory_saving)
    return _assemble(_resnet_parts, core, in_channels=in_channels, out_channels=out_channels, width=width,
                     multiple=2, residual=residual, linear_kernel=linear_kernel)


@GENERATORS.register("srcnn3d")
def srcnn3d(*, in_channels: int, out_channels: int, width: int, depth: int,
            memory_saving: bool = True, residual: bool = False,
                linear_kernel: Sequence[int] | None = None) -> Generator:
    """Non-reversible SRCNN baseline: separate residual cores per direction (`memory_saving` unused)."""
    return _assemble(_srcnn_parts, SeparateCores(width, depth), in_channels=in_channels,
                     out_channels=out_channels, width=width, multiple=1, residual=residual,
                     linear_kernel=linear_kernel)


@GENERATORS.register("resnet3d")
def resnet3d(*, in_channels: int, out_channels: int, width: int, depth: int,
             memory_saving: bool = True, residual: bool = False,
                linear_kernel: Sequence[int] | None = None) -> Generator:
    """Non-reversible 3D ResNet baseline: separate residual cores per direction (`memory_saving` unused)."""
    return _assemble(_resnet_parts, SeparateCores(2 * width, depth), in_channels=in_channels,
                     out_channels=out_channels, width=width, multiple=2, residual=residual,
                     linear_kernel=linear_kernel)


@torch.no_grad()
def init_weights(module: nn.Module, *, std: float = 0.02, zero_last: bool = True) -> None:
    """Thesis §4.3: convolution weights ~ N(0, `std`), biases 0; the last conv of every `Branch` zeroed.

    ``zero_last=False`` keeps those convs random too (non-trivial blocks, e.g. for invertibility checks).
    """
    module.apply(functools.partial(normal_init, std=std))
    if zero_last:
        for m in module.modules():
            if isinstance(m, Branch):
                nn.init.zeros_(m[-1].weight)
                nn.init.zeros_(m[-1].bias)
