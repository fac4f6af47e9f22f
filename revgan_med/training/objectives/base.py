"""Training objectives: small classes behind one training loop (thesis ``000_*`` §3.3, eq. 11 and 12).

An objective owns the networks of one experiment and turns a batch into losses; the loop owns the
optimisers, mixed precision, gradient synchronisation and the schedule. Per iteration the loop calls

1. ``generator_step(batch)`` — losses of the generator side (discriminators frozen); the loop
   back-propagates ``losses["loss"]`` and steps the optimisers of every role in
   ``generator_roles()``;
2. ``discriminator_step(batch)`` — losses of the discriminators on the fakes of step 1 (detached);
   the loop steps the optimisers of ``discriminator_roles()``. Not called when there are none
   (``loss.gan: none``).

A batch is a dict with ``"image"`` (domain X, e.g. the degraded CT) and ``"target"`` (domain Y), both
``(B, C, D, H, W)``; for the unpaired objective the two are drawn independently. Every step returns
``{"loss": total (with grad), <component>: detached scalar, ...}``.

A new objective (e.g. one with a registration network) subclasses `Objective`, registers itself with
``@OBJECTIVES.register(name)``, and adds its extra networks to ``modules()``: each role gets its own
Adam optimiser and schedule and is saved in checkpoints, without changes to the loop.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from revgan_med.config import LossConfig
from revgan_med.networks.linear import BLUR_SIGMAS, UNSHARP_AMOUNTS, classical_filter
from revgan_med.registry import Registry

OBJECTIVES = Registry("objective")


def gan_loss(logits: torch.Tensor, *, real: bool, kind: str) -> torch.Tensor:
    """GAN criterion on raw discriminator logits: ``lsgan`` (MSE to 1/0) or ``vanilla`` (BCE with logits).

    Our own 5 lines: MONAI's PatchAdversarialLoss puts a LeakyReLU in front of the least-squares
    criterion by default and uses sigmoid + BCELoss (unstable, refused under autocast) for ``bce``.
    """
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if kind == "lsgan":
        return F.mse_loss(logits.float(), target.float())
    if kind == "vanilla":
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    raise ValueError(f"unknown GAN criterion {kind!r}; valid: lsgan, vanilla")


class ImagePool:
    """History of generated images shown to a discriminator (CycleGAN, Shrivastava et al. 2017).

    Our own: MONAI has no image pool. Until ``size`` images are stored each new image is stored and
    returned; afterwards, per image, with probability 1/2 a random stored image is returned and
    replaced by the new one. Stored on the CPU (it holds ``size`` full patches); the random choices
    use the global torch generator, which checkpoints save, so a resumed run draws the same.
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"image pool size must be >= 0, got {size}")
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        """Return a batch of the same shape mixing ``batch`` (detached) with stored images."""
        batch = batch.detach()
        if self.size == 0:
            return batch
        out = []
        for image in batch:
            if len(self.images) < self.size:
                self.images.append(image.cpu().clone())
                out.append(image)
            elif torch.rand(()) < 0.5:
                index = int(torch.randint(self.size, ()))
                out.append(self.images[index].to(image.device))
                self.images[index] = image.cpu().clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        return {"images": list(self.images)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images = [image.clone() for image in state["images"]]


class Objective(nn.Module):
    """Base class: holds the generator (``forward`` X→Y, ``inverse`` Y→X) and the discriminators.

    Args:
        generator: one module; a reversible generator shares its core between both directions, a
            plain baseline holds two networks.
        discriminators: role → PatchGAN (``"disc_x"`` judges domain X, ``"disc_y"`` domain Y); empty
            when ``loss.gan`` is ``none``.
        loss: the ``loss:`` section of the config (criterion, weights, pool size).
    """

    #: discriminators see (input, output) concatenated on channels
    conditional = False
    #: batches hold corresponding patches of one case (False: image and target drawn independently)
    paired_data = True
    #: those pairs are voxel-aligned (False: misregistered pairs, which a least-squares fit would blur)
    aligned_pairs = True

    def __init__(
        self, *, generator: nn.Module, discriminators: dict[str, nn.Module], loss: LossConfig
    ) -> None:
        super().__init__()
        self.generator = generator
        self.discriminators = nn.ModuleDict(discriminators)
        self.loss = loss
        # ``loss.window: metric``: the task's metric window in the network's units (`pixel_bounds`)
        self.pixel_bounds: tuple[float, float] | None = None
        if (loss.gan == "none") != (not discriminators):
            raise ValueError(
                f"loss.gan={loss.gan!r} needs {'no' if loss.gan == 'none' else 'two'} discriminators, "
                f"got {sorted(discriminators)}"
            )
        self._fakes: dict[str, torch.Tensor] = {}

    @classmethod
    def discriminator_channels(cls, channels: int, loss: LossConfig) -> dict[str, int]:
        """Role → input channels of the discriminators this objective needs for ``channels`` images
        under the ``loss:`` settings (none without a GAN; no D_X when Y → X is not trained)."""
        if loss.gan == "none":
            return {}
        width = 2 * channels if cls.conditional else channels
        return {"disc_y": width} if loss.lambda_inverse == 0 else {"disc_x": width, "disc_y": width}

    def modules_by_role(self) -> dict[str, nn.Module]:
        """Every trained network by role; each gets an Adam optimiser and is checkpointed."""
        return {"generator": self.generator, **dict(self.discriminators.items())}

    def discriminator_roles(self) -> list[str]:
        return list(self.discriminators)

    def generator_roles(self) -> list[str]:
        return [role for role in self.modules_by_role() if role not in self.discriminators]

    def extra_state(self) -> dict[str, Any]:
        """State beyond the networks' weights that a resumed run needs (tensors and plain data)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def _path_directions(self) -> dict[str, tuple[nn.Module, bool, str, str]]:
        """Direction → (its linear path, whether it is the inverse, source key, target key)."""
        g = self.generator
        return {"X → Y": (g.lin_y, False, "image", "target"), "Y → X": (g.lin_x, True, "target", "image")}

    @torch.no_grad()
    def fit_linear_paths(
        self, batches: Iterable[dict[str, torch.Tensor]], *, symmetric: bool = False,
        clip: tuple[float, float] | None = None,
    ) -> bool:  # fmt: skip
        """Least-squares start of the generator's linear paths (``model.linear_kernel``) from paired batches.

        Each path is fitted to what the rest of the generator leaves, ``y − (F(x) − lin_y(x))`` for
        X → Y and likewise for Y → X; `symmetric`: mirror- and x↔y-symmetric filters (`LinearPath.solve`);
        `clip`: the normalised bounds where the intensity mapping clips, whose voxels are left out
        (`LinearPath.unclipped`); a batch's ``body`` mask (``loss.region: body``) keeps only its voxels.
        Returns False, consuming nothing, for unpaired or misaligned data or a generator without linear
        paths.
        """
        g = self.generator
        if not (self.paired_data and self.aligned_pairs) or getattr(g, "lin_y", None) is None:
            return False
        sums: list[torch.Tensor] = []
        for batch in batches:
            equations = []
            for path, inverse, source, target in self._path_directions().values():
                v, t = batch[source], batch[target]
                rest = (g.inverse if inverse else g.forward)(v) - g.linear_part(v, inverse=inverse)
                valid = None if clip is None else path.unclipped(v, t, clip)
                if "body" in batch:
                    valid = batch["body"] if valid is None else valid & batch["body"]
                equations.extend(path.normal_equations(v, t - rest, valid))
            sums = [a + b for a, b in zip(sums, equations, strict=True)] if sums else equations
        if not sums:
            raise ValueError("fit_linear_paths: no batches")
        for path, name, (gram, cross) in ((g.lin_y, "X → Y", sums[:2]), (g.lin_x, "Y → X", sums[2:])):
            if gram[-1, -1] > 0:  # the bias column counts the equations
                path.solve(gram, cross, symmetric=symmetric)
            else:
                message = (f"linear path {name}: every fit voxel is clipped by the window or outside "
                           "the body; it stays zero")
                warnings.warn(message, stacklevel=2)
        return True

    @torch.no_grad()
    def choose_linear_start(
        self, batches: Sequence[dict[str, torch.Tensor]], bounds: tuple[float, float]
    ) -> dict[str, tuple[str, float, float]]:
        """Per direction, keep the linear path as fitted or replace it by the plain input, a Gaussian
        blur or an unsharp mask (`classical_filter`, the grids `BLUR_SIGMAS` × `UNSHARP_AMOUNTS`),
        whichever gives the model's output (the input plus the path, at the start of a residual model)
        the highest PSNR on `batches` with values clipped to `bounds` (the task's metric window,
        normalised; a batch's ``body`` mask keeps only its voxels), if `CLEAR_WIN_DB` above the fit.

        A squared-error fit cannot overshoot where the window clips; a classical filter may, and can then
        score higher in the window (the head phantom's holder, around the nlst window's top). Returns
        ``{"X → Y" / "Y → X": (chosen name, its PSNR, the least-squares fit's PSNR)}``, in dB of the window.
        """
        g = self.generator
        grid = {"the input": (None, None)}
        for sigma in BLUR_SIGMAS:
            grid[f"Gaussian blur σ {sigma:g}"] = (sigma, None)
            grid.update({f"unsharp mask σ {sigma:g} × {a:.3g}": (sigma, a) for a in UNSHARP_AMOUNTS})
        chosen = {}
        for label, (path, inverse, source, target) in self._path_directions().items():
            errors, count = dict.fromkeys(["least squares", *grid], 0.0), 0.0
            for batch in batches:
                v, t = batch[source].float(), batch[target].float()
                rest = (g.inverse if inverse else g.forward)(v) - g.linear_part(v, inverse=inverse)
                weight = batch["body"].expand_as(t).float() if "body" in batch else torch.ones_like(t)
                count += float(weight.sum())
                error = functools.partial(_clipped_error, target=t, weight=weight, bounds=bounds)
                errors["least squares"] += error(rest + path(v))
                errors["the input"] += error(rest)
                for sigma in BLUR_SIGMAS:  # a filter's path is it minus the input: blur − x, a·(x − blur)
                    detail = v - path.filtered(v, classical_filter(path.kernel_size, sigma))
                    for name, (s, a) in grid.items():
                        if s == sigma:
                            errors[name] += error(rest - detail if a is None else rest + a * detail)
            lo, hi = bounds
            psnr = {n: 10 * math.log10((hi - lo) ** 2 * count / max(e, 1e-30)) for n, e in errors.items()}
            best = max(psnr, key=psnr.get)
            if psnr[best] < psnr["least squares"] + CLEAR_WIN_DB:
                best = "least squares"
            else:
                identity = classical_filter(path.kernel_size)
                path.set_filter(classical_filter(path.kernel_size, *grid[best]) - identity)
            chosen[label] = (best, psnr[best], psnr["least squares"])
        return chosen

    def _gan(self, role: str, images: torch.Tensor, *, real: bool) -> torch.Tensor:
        return gan_loss(self.discriminators[role](images), real=real, kind=self.loss.gan)

    def _discriminator_loss(self, role: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self._gan(role, real, real=True) + self._gan(role, fake, real=False))

    def generator_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def discriminator_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


# a classical filter replaces the least-squares start only this far ahead (dB): 32 patches decide, and on
# the Philips chest they ranked an unsharp mask 0.01–0.2 dB above the fit that the whole training half
# puts 5 dB above it; where the window's clipping is what the fit misses (the head phantom) it was 4–5 dB
CLEAR_WIN_DB = 1.0


def _clipped_error(
    prediction: torch.Tensor, *, target: torch.Tensor, weight: torch.Tensor, bounds: tuple[float, float]
) -> float:
    """Weighted sum of squared differences of the values clipped to `bounds`."""
    return float(((prediction.clamp(*bounds) - target.clamp(*bounds)) ** 2 * weight).sum())


def masked_pixel_loss(
    prediction: torch.Tensor, target: torch.Tensor, *, kind: str = "l1", mask: torch.Tensor | None = None,
    bounds: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``mse``) error, over the voxels `mask` (``(B, 1, …)`` bool)
    marks, in every channel, when given (0 where it marks none); in float32, as F.l1_loss under autocast.

    `bounds` (lo, hi): the error of values clipped to them, as a windowed metric measures it (no gradient
    where the prediction lies beyond them: any value there reads as the edge).
    """
    if bounds is not None:
        prediction, target = prediction.clamp(*bounds), target.clamp(*bounds)
    if mask is None:
        return (F.mse_loss if kind == "mse" else F.l1_loss)(prediction, target)
    difference = prediction.float() - target.float()
    error = difference**2 if kind == "mse" else difference.abs()
    weight = mask.to(error.dtype).expand_as(error)
    return (error * weight).sum() / weight.sum().clamp(min=1)


def _total(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    total = torch.stack([value.float() for value in losses.values()]).sum()
    return {"loss": total, **{name: value.detach() for name, value in losses.items()}}


@OBJECTIVES.register("paired")
class PairedObjective(Objective):
    """Pix2pix in both directions (eq. 11): λ·(L1(F(x), y) + L1(G(y), x)) + cGAN(F, D_Y) + cGAN(G, D_X).

    λ is ``loss.lambda_l1`` (100); D_Y sees (x, y or F(x)), D_X sees (y, x or G(y)). With
    ``loss.gan: none`` only the L1 terms remain (the "w/o L_GAN" rows of thesis Table 4). ``loss.pixel:
    mse`` puts the squared error in place of L1 (losses named ``mse_xy`` / ``mse_yx``). The Y → X terms
    are weighted by ``loss.lambda_inverse`` (1); at 0 they, and D_X, are not computed at all. A batch
    ``body`` mask (``loss.region: body``) restricts the pixel terms to its voxels (their mean there).
    """

    conditional = True

    def generator_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["target"]
        pixel = self.loss.pixel
        criterion = functools.partial(
            masked_pixel_loss, kind=pixel, mask=batch.get("body"), bounds=self.pixel_bounds
        )
        fake_y = self.generator(x)
        losses = {f"{pixel}_xy": self.loss.lambda_l1 * criterion(fake_y, y)}
        if self.discriminators:
            losses["gan_xy"] = self._gan("disc_y", torch.cat([x, fake_y], 1), real=True)
        self._fakes = {"y": fake_y.detach()}
        weight = self.loss.lambda_inverse
        if weight:
            fake_x = self.generator.inverse(y)
            losses[f"{pixel}_yx"] = weight * self.loss.lambda_l1 * criterion(fake_x, x)
            if self.discriminators:
                losses["gan_yx"] = weight * self._gan("disc_x", torch.cat([y, fake_x], 1), real=True)
            self._fakes["x"] = fake_x.detach()
        return _total(losses)

    def discriminator_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["target"]
        judged = {"d_y": ("disc_y", x, y, self._fakes["y"])}  # role, condition, real, fake
        if "x" in self._fakes:  # Y → X trained (loss.lambda_inverse > 0)
            judged["d_x"] = ("disc_x", y, x, self._fakes["x"])
        return _total({
            name: self._discriminator_loss(role, torch.cat([c, real], 1), torch.cat([c, fake], 1))
            for name, (role, c, real, fake) in judged.items()
        })  # fmt: skip


@OBJECTIVES.register("unpaired")
class UnpairedObjective(Objective):
    """CycleGAN-style (eq. 12): GAN(F, D_Y) + GAN(G, D_X) + λ_cycle·(|G(F(x)) − x| + |F(G(y)) − y|).

    λ_cycle is ``loss.lambda_cycle`` (10). With ``loss.lambda_identity`` > 0 the CycleGAN identity
    term λ_cycle·λ_identity·(|F(y) − y| + |G(x) − x|) is added. The discriminators see fakes through
    image pools of ``loss.pool_size`` (50) images.
    """

    paired_data = False

    def __init__(
        self, *, generator: nn.Module, discriminators: dict[str, nn.Module], loss: LossConfig
    ) -> None:
        if loss.gan == "none":
            raise ValueError("objective 'unpaired' needs a GAN loss: loss.gan must be lsgan or vanilla")
        super().__init__(generator=generator, discriminators=discriminators, loss=loss)
        self.pool_x = ImagePool(loss.pool_size)
        self.pool_y = ImagePool(loss.pool_size)

    def extra_state(self) -> dict[str, Any]:
        return {"pool_x": self.pool_x.state_dict(), "pool_y": self.pool_y.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pool_x.load_state_dict(state["pool_x"])
        self.pool_y.load_state_dict(state["pool_y"])

    def generator_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["target"]
        fake_y, fake_x = self.generator(x), self.generator.inverse(y)
        lam = self.loss.lambda_cycle
        losses = {
            "gan_xy": self._gan("disc_y", fake_y, real=True),
            "gan_yx": self._gan("disc_x", fake_x, real=True),
            "cycle_x": lam * F.l1_loss(self.generator.inverse(fake_y), x),
            "cycle_y": lam * F.l1_loss(self.generator(fake_x), y),
        }
        if self.loss.lambda_identity > 0:
            weight = lam * self.loss.lambda_identity
            losses["identity_y"] = weight * F.l1_loss(self.generator(y), y)
            losses["identity_x"] = weight * F.l1_loss(self.generator.inverse(x), x)
        self._fakes = {"x": fake_x.detach(), "y": fake_y.detach()}
        return _total(losses)

    def discriminator_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fake_x, fake_y = self.pool_x.query(self._fakes["x"]), self.pool_y.query(self._fakes["y"])
        return _total(
            {
                "d_y": self._discriminator_loss("disc_y", batch["target"], fake_y),
                "d_x": self._discriminator_loss("disc_x", batch["image"], fake_x),
            }
        )


def build_objective(
    name: str, *, generator: nn.Module, discriminators: dict[str, nn.Module], loss: LossConfig
) -> Objective:
    """Build a registered objective (`OBJECTIVES.names()` lists them)."""
    return OBJECTIVES.build(name, generator=generator, discriminators=discriminators, loss=loss)
