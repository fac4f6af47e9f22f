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
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.utils import normal_init
from torch import Tensor, nn

from revgan_med.networks.coupling import AdditiveCoupling, ReversibleSequence
from revgan_med.registry import Registry

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
        memory_saving=memory_saving,
    )
    model.residual = residual
    if linear_kernel is not None:
        model.lin_y = LinearPath(in_channels, out_channels, linear_kernel)
        model.lin_x = LinearPath(out_channels, in_channels, linear_kernel)
    init_weights(model)
    gated = residual and linear_kernel is not None
    if gated:
        model.gate = nn.Parameter(torch.zeros(()))
    elif residual:
        for dec in (model.dec_x, model.dec_y):
            last = [m for m in dec.modules() if isinstance(m, nn.Conv3d)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
    for path in (model.lin_x, model.lin_y) if linear_kernel is not None else ():
        path.reset_parameters()
    return model


class LinearPath(nn.Conv3d):
    """A learned linear filter from a generator's input to its output, zero until trained or `solve`d.

    Replicate padding, so any volume size works. `solve` sets it by least squares at once: the best
    filter between a smooth and a sharp kernel has a centre weight near 9, which Adam at lr 1e-3 would
    need some ten thousand steps to reach.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        kernel = tuple(kernel)
        if len(kernel) != 3 or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel):
            raise ValueError(f"linear_kernel must be three odd positive integers, got {list(kernel)}")
        super().__init__(in_channels, out_channels, kernel, padding=tuple(k // 2 for k in kernel),
                         padding_mode="replicate")  # fmt: skip

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def normal_equations(
        self, source: Tensor, target: Tensor, chunk: int = 1 << 16
    ) -> tuple[Tensor, Tensor]:
        """``(AᵀA, AᵀT)`` in float64 for inputs ``(B, in_channels, …)`` and targets ``(B, out_channels, …)``.

        A's rows are each voxel's neighbourhood (in the weights' order) and a 1, T's rows its target; sums
        over pairs are the normal equations of all of them. Only voxels whose whole neighbourhood lies
        inside the input count (padded borders of small patches would bias the fit). Built a few slices
        at a time to bound memory.
        """
        (kd, kh, kw), (pd, ph, pw) = self.kernel_size, self.padding
        if any(n < k for n, k in zip(source.shape[2:], self.kernel_size, strict=True)):
            raise ValueError(
                f"linear path {list(self.kernel_size)}: input {list(source.shape[2:])} is smaller than it"
            )
        target = target[:, :, pd : target.shape[2] - pd, ph : target.shape[3] - ph, pw : target.shape[4] - pw]
        target = target.movedim(1, -1)
        depth = target.shape[1]
        step = max(1, chunk // target.shape[2:4].numel())
        gram = cross = 0
        for start in range(0, depth, step):
            stop = min(depth, start + step)
            cols = source[:, :, start : stop + kd - 1].unfold(2, kd, 1).unfold(3, kh, 1).unfold(4, kw, 1)
            cols = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, self.weight[0].numel()).double()
            a = torch.cat([cols, cols.new_ones(cols.shape[0], 1)], dim=1)
            gram = gram + a.T @ a
            cross = cross + a.T @ target[:, start:stop].reshape(-1, self.out_channels).double()
        return gram, cross

    @torch.no_grad()
    def solve(self, gram: Tensor, cross: Tensor, ridge: float = 1e-6) -> None:
        """Set weights and bias to the least-squares solution of summed `normal_equations`.

        A small ridge relative to the mean diagonal keeps flat (e.g. all-air) data solvable.
        """
        eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        solution = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, cross)
        self.weight.copy_(solution[:-1].T.reshape(self.weight.shape))
        self.bias.copy_(solution[-1])


class DomainGate(nn.Module):
    """Which domain each window ``(B, C, …)`` comes from, X (True) or Y, by its texture → ``(B, 1, 1, 1, 1)``.

    A self-inverse generator applies ONE function to both kernels, so it must tell a smooth input
    (to sharpen) from a sharp one (to smooth) before choosing its linear path; applying the wrong one
    amplifies noise or blurs twice. Per voxel the evidence is weak (anatomy changes the spectrum more
    than the kernel does), over a whole window it is not. The features are the log mean energies e0,
    e1, e2 of three difference-of-box bands (box sides 3, 5, 9 along the axes the linear paths filter,
    all three for a 1×1×1 path) as ``[e0 − e1, e1 − e2, e0, 1]`` (e0 lets the threshold on the ratios
    move with the signal: air and body differ more than the kernels do); the decision is linear in them,
    `fit` by logistic regression. Its weights are a buffer: fitted, not trained (a hard decision has no
    gradient). MONAI has no texture-domain classifier.
    """

    BOXES = (3, 5, 9)

    def __init__(self, kernel: Sequence[int]) -> None:
        super().__init__()
        filtered = tuple(int(k) > 1 for k in kernel)
        self.axes = filtered if any(filtered) else (True,) * 3
        self.register_buffer("weight", torch.zeros(4))

    def features(self, v: Tensor) -> Tensor:
        """``(B, 4)`` texture features of the windows ``(B, C, X, Y, Z)``."""
        smooth, bands = v.float(), []
        for side in self.BOXES:
            size = [side if on else 1 for on in self.axes]
            pad = [p for k in reversed(size) for p in (k // 2, k // 2)]
            coarser = F.avg_pool3d(F.pad(smooth, pad, mode="replicate"), size, stride=1)
            bands.append(torch.log((smooth - coarser).square().mean(dim=(1, 2, 3, 4)) + 1e-12))
            smooth = coarser
        e0, e1, e2 = bands
        return torch.stack([e0 - e1, e1 - e2, e0, torch.ones_like(e0)], dim=1)

    def forward(self, v: Tensor) -> Tensor:
        return (self.features(v) @ self.weight > 0).view(-1, 1, 1, 1, 1)

    @torch.no_grad()
    def fit(
        self, x_features: Tensor, y_features: Tensor, *, ridge: float = 1e-3, iterations: int = 50
    ) -> None:
        """Logistic regression (Newton steps, small ridge: the classes are usually separable) of the
        `features` of windows of domain X against those of domain Y.

        Least squares would do with sums alone, but it is pulled by far-from-the-boundary windows (air
        outside the body has its own texture) and then misjudged one window in fifteen on the B/L pair.
        """
        a = torch.cat([x_features, y_features]).double()
        label = torch.cat([a.new_ones(len(x_features)), a.new_zeros(len(y_features))])
        w = a.new_zeros(a.shape[1])
        eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
        for _ in range(iterations):
            p = torch.sigmoid(a @ w)
            hessian = (a * (p * (1 - p))[:, None]).T @ a + ridge * eye
            w = w + torch.linalg.solve(hessian, a.T @ (label - p) - ridge * w)
        self.weight.copy_(w)


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
        multiple: int = 1, min_size: int = 1, residual: bool = False,
    ) -> None:
        super().__init__()
        self.enc_x, self.enc_y, self.core, self.dec_x, self.dec_y = enc_x, enc_y, core, dec_x, dec_y
        self.multiple, self.min_size, self.residual = multiple, min_size, residual
        self.lin_x: LinearPath | None = None
        self.lin_y: LinearPath | None = None
        self.gate: nn.Parameter | None = None  # scales the network's correction (see `build_generator`)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        if self.gate is not None and prefix + "gate" not in state_dict:
            state_dict[prefix + "gate"] = torch.ones(())  # saved before the gate: its correction was ungated
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        out = self._translate(x, self.enc_x, self.core.forward, self.dec_y)
        return out + self.linear_part(x, inverse=False)

    def inverse(self, y: Tensor) -> Tensor:
        out = self._translate(y, self.enc_y, self.core.inverse, self.dec_x)
        return out + self.linear_part(y, inverse=True)

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
        out = dec(core(enc(padded)))[..., : size[0], : size[1], : size[2]]
        if self.gate is not None:
            out = self.gate * out
        return v + out if self.residual else out


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
              in_channels: int, out_channels: int, width: int, multiple: int) -> Generator:
    enc_x, dec_y = parts(in_channels, out_channels, width)
    enc_y, dec_x = parts(out_channels, in_channels, width)
    # reflection padding needs a side > pad: 2 for 3³ convs; 4 for the ResNet (5³ convs, 3³ at half size)
    return Generator(enc_x=enc_x, enc_y=enc_y, core=core, dec_x=dec_x, dec_y=dec_y, multiple=multiple,
                     min_size=2 * multiple)


@GENERATORS.register("rev_srcnn3d")
def rev_srcnn3d(*, in_channels: int, out_channels: int, width: int, depth: int,
                memory_saving: bool = True) -> Generator:
    """Reversible 3D SRCNN: full-resolution core of `depth` coupling blocks on `width` channels."""
    core = _reversible_core(width, depth, memory_saving)
    return _assemble(_srcnn_parts, core, in_channels=in_channels, out_channels=out_channels, width=width,
                     multiple=1)


@GENERATORS.register("rev_resnet3d")
def rev_resnet3d(*, in_channels: int, out_channels: int, width: int, depth: int,
                 memory_saving: bool = True) -> Generator:
    """Reversible 3D ResNet: core of `depth` coupling blocks on 2·`width` channels at half resolution."""
    core = _reversible_core(2 * width, depth, memory_saving)
    return _assemble(_resnet_parts, core, in_channels=in_channels, out_channels=out_channels, width=width,
                     multiple=2)


@GENERATORS.register("srcnn3d")
def srcnn3d(*, in_channels: int, out_channels: int, width: int, depth: int,
            memory_saving: bool = True) -> Generator:
    """Non-reversible SRCNN baseline: separate residual cores per direction (`memory_saving` unused)."""
    return _assemble(_srcnn_parts, SeparateCores(width, depth), in_channels=in_channels,
                     out_channels=out_channels, width=width, multiple=1)


@GENERATORS.register("resnet3d")
def resnet3d(*, in_channels: int, out_channels: int, width: int, depth: int,
             memory_saving: bool = True) -> Generator:
    """Non-reversible 3D ResNet baseline: separate residual cores per direction (`memory_saving` unused)."""
    return _assemble(_resnet_parts, SeparateCores(2 * width, depth), in_channels=in_channels,
                     out_channels=out_channels, width=width, multiple=2)


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
