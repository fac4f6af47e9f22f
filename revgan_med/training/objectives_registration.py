"""Self-inverse and registration-corrected objectives (issue 7), registered into `OBJECTIVES`.

- ``self-inverse`` (``002_*`` §4, "one2one"): ONE generator f with f = f⁻¹, trained on paired data by
  alternating x → y and y → x steps with L1 + a conditional GAN whose ONE discriminator serves both
  directions.
- ``reggan`` (``004_*``, Kong et al. 2021): paired training that tolerates misaligned pairs. A
  registration network R predicts a displacement field T from (F(x), y); the generator is trained on
  Corr = L1(F(x) ∘ T, y) (weight 20), Smooth = mean squared spatial gradient of T (weight 10) and an
  unconditional Adv term (weight 1); G and R are updated together (both are generator-side roles).
- ``reggan-cycle`` (their "C+R" mode): the same correction on top of the cycle objective.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from revgan_med.config import LossConfig
from revgan_med.networks.generators import DomainGate, Generator, SeparateCores
from revgan_med.networks.registration import RegistrationNet, smoothness_loss, warp
from revgan_med.training.objectives import OBJECTIVES, ImagePool, Objective, _total

__all__ = ["RegGANCycleObjective", "RegGANObjective", "SelfInverseGenerator", "SelfInverseObjective"]


class SelfInverseGenerator(Generator):
    """One function f for both directions: ``inverse(v) = forward(v) = dec ∘ core ∘ enc (v)``.

    Built from a `Generator` by sharing modules: ``enc_y`` IS ``enc_x`` and ``dec_x`` IS ``dec_y`` (and,
    for the plain baselines, the Y → X core IS the X → Y core), so `parameters()` holds one encoder, one
    core and one decoder. Compared with the generator of the ``paired`` objective, which needs both
    directions: exactly half the parameters for the plain baselines (one network instead of two, as the
    paper's one2one vs two pix2pix models); for the reversible generators, whose core is already shared,
    the second encoder/decoder pair is saved. The state dict keeps the usual keys (shared tensors appear
    under both names).

    With linear paths (``model.linear_kernel``) f keeps BOTH, X → Y (``lin_y``) and Y → X (``lin_x``):
    no one linear filter both sharpens and smooths. A `DomainGate` (``domain``) picks one per window
    from the input's texture, so f stays one function of its input; its bands follow the paths' kernel.
    Both paths and the gate are fitted at the start (``train.linear_fit_batches``), not trained: the
    shared network's compromise between the directions pulls trained paths off their fit (on the B/L
    pair, trained paths cost 0.6 dB L → B in 400 steps).
    """

    def inverse(self, y: Tensor) -> Tensor:
        return self.forward(y)

    def linear_part(self, v: Tensor, *, inverse: bool) -> Tensor | float:
        if self.domain is None:
            return 0.0
        return torch.where(self.domain(v), self.lin_y(v), self.lin_x(v))

    @classmethod
    def from_generator(cls, generator: Generator) -> SelfInverseGenerator:
        """Share `generator`'s X-side encoder, Y-side decoder and forward core between both directions."""
        if not isinstance(generator, Generator):
            raise ValueError(f"self-inverse needs a revgan_med Generator, got {type(generator).__name__}")
        core = generator.core
        if isinstance(core, SeparateCores):
            core.yx = core.xy
        inverse = cls(
            enc_x=generator.enc_x,
            enc_y=generator.enc_x,
            core=core,
            dec_x=generator.dec_y,
            dec_y=generator.dec_y,
            multiple=generator.multiple,
            min_size=generator.min_size,
            residual=generator.residual,
        )
        inverse.lin_x, inverse.lin_y, inverse.gate = generator.lin_x, generator.lin_y, generator.gate
        inverse.domain = None
        if generator.lin_y is not None:
            inverse.domain = DomainGate(generator.lin_y.kernel_size)
            for path in (inverse.lin_x, inverse.lin_y):
                path.requires_grad_(False)
        return inverse


@OBJECTIVES.register("self-inverse")
class SelfInverseObjective(Objective):
    """One2one: λ·L1(f(a), b) + cGAN(f, D) on (a, b) = (x, y) at even steps and (y, x) at odd steps.

    λ is ``loss.lambda_l1`` (100). The single conditional discriminator ``disc`` sees (a, b or f(a)) in
    both directions. Image domains must have the same channels. At inference the direction does not
    matter: `inverse` is `forward` (``generator_from_checkpoint`` rebuilds the `SelfInverseGenerator`).
    """

    conditional = True

    def __init__(
        self, *, generator: nn.Module, discriminators: dict[str, nn.Module], loss: LossConfig
    ) -> None:
        super().__init__(
            generator=SelfInverseGenerator.from_generator(generator), discriminators=discriminators, loss=loss
        )
        self.steps_done = 0

    @classmethod
    def discriminator_channels(cls, channels: int, gan: str) -> dict[str, int]:
        return {} if gan == "none" else {"disc": 2 * channels}

    def extra_state(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])

    def fit_linear_paths(self, batches: Iterable[dict[str, Tensor]]) -> bool:
        """The paths' least-squares start (`Objective.fit_linear_paths`) and, from the same batches, the
        domain gate: sources are domain X, targets domain Y."""
        domain = self.generator.domain
        if domain is None:
            return super().fit_linear_paths(batches)
        seen: dict[str, list[Tensor]] = {"image": [], "target": []}

        def recorded() -> Iterator[dict[str, Tensor]]:
            for batch in batches:
                for key, features in seen.items():
                    features.append(domain.features(batch[key]))
                yield batch

        fitted = super().fit_linear_paths(recorded())
        domain.fit(torch.cat(seen["image"]), torch.cat(seen["target"]))
        return fitted

    def generator_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        forward = self.steps_done % 2 == 0
        source, target = (batch["image"], batch["target"]) if forward else (batch["target"], batch["image"])
        self.steps_done += 1
        fake = self.generator(source)
        name = "xy" if forward else "yx"
        losses = {f"l1_{name}": self.loss.lambda_l1 * F.l1_loss(fake, target)}
        if self.discriminators:
            losses[f"gan_{name}"] = self._gan("disc", torch.cat([source, fake], 1), real=True)
        self._fakes = {"source": source, "target": target, "fake": fake.detach()}
        return _total(losses)

    def discriminator_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        source, target, fake = self._fakes["source"], self._fakes["target"], self._fakes["fake"]
        real_pair, fake_pair = torch.cat([source, target], 1), torch.cat([source, fake], 1)
        return _total({"d": self._discriminator_loss("disc", real_pair, fake_pair)})


def _registration_net(loss: LossConfig, channels: int) -> RegistrationNet:
    return RegistrationNet(
        in_channels=channels, width=loss.registration_width, levels=loss.registration_levels
    )


def _image_channels(generator: nn.Module) -> int:
    """Channels of domain Y: in-channels of the first convolution of the Y-side encoder."""
    first = next(m for m in generator.enc_y.modules() if isinstance(m, nn.Conv3d))
    return first.in_channels


class _Correction:
    """Corr and Smooth terms of RegGAN for a fake/real pair (shared by both reggan objectives)."""

    registration: RegistrationNet
    loss: LossConfig
    aligned_pairs = False  # the pairs are misregistered: no least-squares start of linear paths

    def _corrected(self, fake_y: Tensor, y: Tensor) -> dict[str, Tensor]:
        field = self.registration(fake_y, y)
        return {
            "corr": self.loss.lambda_corr * F.l1_loss(warp(fake_y, field), y),
            "smooth": self.loss.lambda_smooth * smoothness_loss(field),
        }


@OBJECTIVES.register("reggan")
class RegGANObjective(_Correction, Objective):
    """RegGAN ("NC+R"): λ_corr·L1(F(x) ∘ R(F(x), y), y) + λ_smooth·Smooth + λ_adv·GAN(F, D_Y).

    Weights ``loss.lambda_corr`` (20), ``loss.lambda_smooth`` (10), ``loss.lambda_adv`` (1); the
    discriminator ``disc_y`` is unconditional as in RegGAN. R (``registration`` role, width
    ``loss.registration_width``) gets its own optimiser and is stepped with the generator.
    """

    def __init__(
        self, *, generator: nn.Module, discriminators: dict[str, nn.Module], loss: LossConfig
    ) -> None:
        super().__init__(generator=generator, discriminators=discriminators, loss=loss)
        self.registration = _registration_net(loss, _image_channels(generator))

    @classmethod
    def discriminator_channels(cls, channels: int, gan: str) -> dict[str, int]:
        return {} if gan == "none" else {"disc_y": channels}

    def modules_by_role(self) -> dict[str, nn.Module]:
        return {**super().modules_by_role(), "registration": self.registration}

    def generator_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["image"], batch["target"]
        fake_y = self.generator(x)
        losses = self._corrected(fake_y, y)
        if self.discriminators:
            losses["adv"] = self.loss.lambda_adv * self._gan("disc_y", fake_y, real=True)
        self._fakes = {"y": fake_y.detach()}
        return _total(losses)

    def discriminator_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        d_y = self._discriminator_loss("disc_y", batch["target"], self._fakes["y"])
        return _total({"d_y": self.loss.lambda_adv * d_y})


@OBJECTIVES.register("reggan-cycle")
class RegGANCycleObjective(_Correction, Objective):
    """RegGAN "C+R": cycle objective + Corr/Smooth on F(x) against its (misaligned) paired target.

    ``λ_adv·(GAN(F, D_Y) + GAN(G, D_X)) + λ_cycle·(|G(F(x)) − x| + |F(G(y)) − y|) + Corr + Smooth``,
    discriminators on image pools of ``loss.pool_size`` as for ``unpaired``.
    """

    def __init__(
        self, *, generator: nn.Module, discriminators: dict[str, nn.Module], loss: LossConfig
    ) -> None:
        if loss.gan == "none":
            raise ValueError("objective 'reggan-cycle' needs a GAN loss: loss.gan must be lsgan or vanilla")
        super().__init__(generator=generator, discriminators=discriminators, loss=loss)
        self.registration = _registration_net(loss, _image_channels(generator))
        self.pool_x, self.pool_y = ImagePool(loss.pool_size), ImagePool(loss.pool_size)

    def modules_by_role(self) -> dict[str, nn.Module]:
        return {**super().modules_by_role(), "registration": self.registration}

    def extra_state(self) -> dict[str, Any]:
        return {"pool_x": self.pool_x.state_dict(), "pool_y": self.pool_y.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pool_x.load_state_dict(state["pool_x"])
        self.pool_y.load_state_dict(state["pool_y"])

    def generator_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["image"], batch["target"]
        fake_y, fake_x = self.generator(x), self.generator.inverse(y)
        lam, adv = self.loss.lambda_cycle, self.loss.lambda_adv
        losses = {
            "adv_xy": adv * self._gan("disc_y", fake_y, real=True),
            "adv_yx": adv * self._gan("disc_x", fake_x, real=True),
            "cycle_x": lam * F.l1_loss(self.generator.inverse(fake_y), x),
            "cycle_y": lam * F.l1_loss(self.generator(fake_x), y),
            **self._corrected(fake_y, y),
        }
        self._fakes = {"x": fake_x.detach(), "y": fake_y.detach()}
        return _total(losses)

    def discriminator_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        fake_x, fake_y = self.pool_x.query(self._fakes["x"]), self.pool_y.query(self._fakes["y"])
        adv = self.loss.lambda_adv
        return _total(
            {
                "d_y": adv * self._discriminator_loss("disc_y", batch["target"], fake_y),
                "d_x": adv * self._discriminator_loss("disc_x", batch["image"], fake_x),
            }
        )
