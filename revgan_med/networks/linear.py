"""Linear in-plane filter paths of the generators and the texture gate that picks one per window.

A reconstruction kernel is close to a linear in-plane filter, which the normalised networks approximate
poorly but least squares fits exactly; a self-inverse generator keeps one path per direction and needs
the gate to decide which one applies to its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from revgan_med.runtime import float32_island


class LinearPath(nn.Conv3d):
    """A learned linear filter from a generator's input to its output, zero until trained or `solve`d.

    Replicate padding, so any volume size works. `solve` sets it by least squares at once: the best
    filter between a smooth and a sharp kernel has a centre weight near 9, which Adam at lr 1e-3 would
    need some ten thousand steps to reach. The solution is also kept apart (buffers ``solved_*``, not
    trained): `solved` applies it, the baseline a trained model is measured against and falls back to.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        kernel = tuple(kernel)
        if len(kernel) != 3 or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel):
            raise ValueError(f"linear_kernel must be three odd positive integers, got {list(kernel)}")
        super().__init__(in_channels, out_channels, kernel, padding=tuple(k // 2 for k in kernel),
                         padding_mode="replicate")  # fmt: skip
        self.register_buffer("solved_weight", torch.zeros_like(self.weight))
        self.register_buffer("solved_bias", torch.zeros_like(self.bias))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for name in ("weight", "bias"):  # saved before the solution was kept: the path as saved
            if prefix + name in state_dict and prefix + f"solved_{name}" not in state_dict:
                state_dict[prefix + f"solved_{name}"] = state_dict[prefix + name].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def solved(self, v: Tensor) -> Tensor:
        """The filter as `solve` left it (zero if never solved), however far training has moved it."""
        return self._conv_forward(v, self.solved_weight, self.solved_bias)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def normal_equations(
        self, source: Tensor, target: Tensor, valid: Tensor | None = None, chunk: int = 1 << 16
    ) -> tuple[Tensor, Tensor]:
        """``(AᵀA, AᵀT)`` in float64 for inputs ``(B, in_channels, …)`` and targets ``(B, out_channels, …)``.

        A's rows are each voxel's neighbourhood (in the weights' order) and a 1, T's rows its target; sums
        over pairs are the normal equations of all of them. Only voxels whose whole neighbourhood lies
        inside the input count (padded borders of small patches would bias the fit), and of those only
        the ones `valid` (``(B, 1, …)`` bool, target-shaped) marks, when given. Built a few slices at a
        time to bound memory.
        """
        (kd, kh, kw), (pd, ph, pw) = self.kernel_size, self.padding
        if any(n < k for n, k in zip(source.shape[2:], self.kernel_size, strict=True)):
            raise ValueError(
                f"linear path {list(self.kernel_size)}: input {list(source.shape[2:])} is smaller than it"
            )
        interior = (..., *(slice(p, n - p) for p, n in zip((pd, ph, pw), target.shape[2:], strict=True)))
        target = target[interior].movedim(1, -1)
        rows = None if valid is None else valid[interior].movedim(1, -1)
        depth = target.shape[1]
        step = max(1, chunk // target.shape[2:4].numel())
        gram = cross = 0
        for start in range(0, depth, step):
            stop = min(depth, start + step)
            cols = source[:, :, start : stop + kd - 1].unfold(2, kd, 1).unfold(3, kh, 1).unfold(4, kw, 1)
            cols = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, self.weight[0].numel()).double()
            a = torch.cat([cols, cols.new_ones(cols.shape[0], 1)], dim=1)
            weighted = a if rows is None else a * rows[:, start:stop].reshape(-1, 1)
            gram = gram + weighted.T @ a
            cross = cross + weighted.T @ target[:, start:stop].reshape(-1, self.out_channels).double()
        return gram, cross

    def unclipped(self, source: Tensor, target: Tensor, bounds: tuple[float, float]) -> Tensor:
        """``(B, 1, …)`` bool: voxels whose target and whole input neighbourhood lie strictly inside
        `bounds`. A window clips at its edges (air below −1024 HU, noise of a sharp kernel there), and
        clipped values are no linear function of their neighbours: in the Philips chest pair they are
        23 % of the smooth → sharp equations, and leaving them out raised the held-out filter by 1–2 dB."""
        lo, hi = bounds

        def clipped(v: Tensor) -> Tensor:
            return ((v <= lo) | (v >= hi)).any(dim=1, keepdim=True)

        pad = [k // 2 for k in self.kernel_size]
        near = F.max_pool3d(clipped(source).float(), self.kernel_size, stride=1, padding=pad) > 0
        return ~(near | clipped(target))

    @torch.no_grad()
    def solve(self, gram: Tensor, cross: Tensor, ridge: float = 1e-7, *, symmetric: bool = False) -> None:
        """Set weights and bias to the least-squares solution of summed `normal_equations`.

        The weights are solved on centred data (the bias takes the means), with a ridge of `ridge` times
        the mean variance of the neighbourhood values, so the fit does not depend on where the intensity
        mapping puts 0 HU (a penalty on the raw diagonal grows with the squared mean: in the ct-full
        window, 0 HU at −0.5, it was ~15× the variance and damped the sharpening filter, −1.1 dB held-out
        on the Philips B → L pair at 1e-6). Held-out PSNR is flat below 1e-7 on both shared pairs;
        flat data (no variance) gets zero weights. `symmetric` fits the best filter that is
        mirror-symmetric along each axis and, when its x and y sizes match, unchanged by swapping x and
        y (as a reconstruction kernel is, in-plane); the weights tied together are solved as one unknown.
        """
        count, sums = gram[-1, -1], gram[:-1, -1:]  # the bias column counts the equations, sums the values
        centred = gram[:-1, :-1] - sums @ sums.T / count
        centred_cross = cross[:-1] - sums @ cross[-1:] / count
        tie = self._symmetry_ties().to(gram) if symmetric else torch.eye(len(centred)).to(gram)
        scale = centred.diagonal().mean()
        weights = torch.zeros_like(centred_cross)
        # flat data leaves only rounding in the centred sums (~1e-14 of the raw ones): no filter to fit
        if scale > 1e-10 * gram.diagonal()[:-1].mean():  # the same ridge on every weight, tied or not
            system = tie.T @ centred @ tie + ridge * scale * (tie.T @ tie)
            weights = tie @ torch.linalg.solve(system, tie.T @ centred_cross)
        self.weight.copy_(weights.T.reshape(self.weight.shape))
        self.bias.copy_(((cross[-1:] - sums.T @ weights) / count)[0])
        self.solved_weight.copy_(self.weight)
        self.solved_bias.copy_(self.bias)

    def _per_channel(self, weight: Tensor, like: Tensor) -> Tensor:
        """The path's weights for the ``kernel``-shaped filter `weight` applied to each channel alone."""
        eye = torch.eye(self.out_channels, self.in_channels).to(like)
        return eye[:, :, None, None, None] * weight.to(like)

    def filtered(self, v: Tensor, weight: Tensor) -> Tensor:
        """`v` filtered by `weight` (``kernel``-shaped, each channel alone), padded as the path pads."""
        return self._conv_forward(v, self._per_channel(weight, v), None)

    @torch.no_grad()
    def set_filter(self, weight: Tensor, bias: float = 0.0) -> None:
        """Make the path the filter `weight` (``kernel``-shaped, applied to each channel alone) plus
        `bias`, as the baseline `solved` keeps too (the start chosen among classical filters)."""
        self.weight.copy_(self._per_channel(weight, self.weight))
        self.bias.fill_(bias)
        self.solved_weight.copy_(self.weight)
        self.solved_bias.copy_(self.bias)

    def _symmetry_ties(self) -> Tensor:
        """``(weights, unknowns)`` 0/1 matrix: each weight → its symmetry orbit."""
        index = torch.arange(self.weight[0].numel()).reshape(self.weight.shape[1:])  # (in, x, y, z)
        images = []
        for swap in (False, True) if self.kernel_size[0] == self.kernel_size[1] else (False,):
            for flips in range(8):
                t = index.transpose(1, 2) if swap else index
                images.append(t.flip([1 + a for a in range(3) if flips >> a & 1]).reshape(-1))
        orbit = torch.stack(images).min(dim=0).values  # each weight's smallest partner under the group
        _, unknown = torch.unique(orbit, return_inverse=True)
        tie = torch.zeros(len(unknown), int(unknown.max()) + 1, dtype=torch.float64)
        tie[torch.arange(len(unknown)), unknown] = 1
        return tie


# the classical filters a path may start from (`classical_filter`): in-plane Gaussian blurs and unsharp
# masks, the grids the kernel benchmark tunes them on (sharp kernels sit near a high-gain Laplacian)
BLUR_SIGMAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0)  # voxels
UNSHARP_AMOUNTS = tuple(0.25 * 2 ** (k / 2) for k in range(17))  # 0.25 … 64


def gaussian_kernel(kernel: Sequence[int], sigma: float) -> Tensor:
    """``kernel``-shaped float64 Gaussian of `sigma` voxels over the offsets from its centre, summing to 1
    (a size-1 axis is not blurred: a [7, 7, 1] path's Gaussian is in-plane, cut off at its edge)."""
    axes = [torch.arange(k, dtype=torch.float64) - k // 2 for k in kernel]
    squared = sum(g**2 for g in torch.meshgrid(*axes, indexing="ij"))
    weights = torch.exp(-squared / (2 * sigma**2))
    return weights / weights.sum()


def classical_filter(
    kernel: Sequence[int], sigma: float | None = None, amount: float | None = None
) -> Tensor:
    """``kernel``-shaped float64 filter: the plain input (no `sigma`), the Gaussian blur of `sigma` (no
    `amount`) or the unsharp mask ``x + amount·(x − blur(x))``."""
    identity = torch.zeros(tuple(kernel), dtype=torch.float64)
    identity[tuple(k // 2 for k in kernel)] = 1
    if sigma is None:
        return identity
    blur = gaussian_kernel(kernel, sigma)
    return blur if amount is None else identity + amount * (identity - blur)


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
        with float32_island(v.device.type):  # a low-precision matmul could flip a close decision
            return (self.features(v) @ self.weight.float() > 0).view(-1, 1, 1, 1, 1)

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
