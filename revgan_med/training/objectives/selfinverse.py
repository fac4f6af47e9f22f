"""The self-inverse objective (``002_*`` §4, "one2one"), registered into `OBJECTIVES`.

ONE generator f with f = f⁻¹, trained on paired data by alternating x → y and y → x steps with L1 + a
conditional GAN whose ONE discriminator serves both directions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from revgan_med.config import LossConfig
from revgan_med.networks.selfinverse import SelfInverseGenerator
from revgan_med.training.objectives.base import OBJECTIVES, Objective, _total


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
    def discriminator_channels(cls, channels: int, loss: LossConfig) -> dict[str, int]:
        return {} if loss.gan == "none" else {"disc": 2 * channels}

    def extra_state(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])

    def fit_linear_paths(
        self, batches: Iterable[dict[str, Tensor]], *, symmetric: bool = False,
        clip: tuple[float, float] | None = None,
    ) -> bool:  # fmt: skip
        """The paths' least-squares start (`Objective.fit_linear_paths`) and, from the same batches, the
        domain gate: sources are domain X, targets domain Y."""
        domain = self.generator.domain
        if domain is None:
            return super().fit_linear_paths(batches, symmetric=symmetric, clip=clip)
        seen: dict[str, list[Tensor]] = {"image": [], "target": []}

        def recorded() -> Iterator[dict[str, Tensor]]:
            for batch in batches:
                for key, features in seen.items():
                    features.append(domain.features(batch[key]))
                yield batch

        fitted = super().fit_linear_paths(recorded(), symmetric=symmetric, clip=clip)
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
