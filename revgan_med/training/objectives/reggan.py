"""Registration-corrected objectives, registered into `OBJECTIVES`.

- ``reggan`` (``004_*``, Kong et al. 2021): paired training that tolerates misaligned pairs. A
  registration network R predicts a displacement field T from (F(x), y); the generator is trained on
  Corr = L1(F(x) ∘ T, y) (weight 20), Smooth = mean squared spatial gradient of T (weight 10) and an
  unconditional Adv term (weight 1); G and R are updated together (both are generator-side roles).
- ``reggan-cycle`` (their "C+R" mode): the same correction on top of the cycle objective.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from revgan_med.config import LossConfig
from revgan_med.networks.registration import RegistrationNet, smoothness_loss, warp
from revgan_med.training.objectives.base import OBJECTIVES, ImagePool, Objective, _total

__all__ = ["RegGANCycleObjective", "RegGANObjective"]


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
    def discriminator_channels(cls, channels: int, loss: LossConfig) -> dict[str, int]:
        return {} if loss.gan == "none" else {"disc_y": channels}

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
