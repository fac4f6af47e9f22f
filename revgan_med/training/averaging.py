"""An exponential moving average of the generator's weights (``train.ema_decay``), the model a run
validates, keeps as ``best.pt`` and hands to inference.

At a constant learning rate the weights keep moving with each patch they were last shown; their
running average does not (with the shipped decay of the rate to 0 it changed nothing in a 1500-step
kernel run: README, "Status of the quality checks"). The average starts at the generator
as it is when training begins (after the least-squares fit of its linear paths), and its decay warms
up as ``min(decay, (1 + n) / (10 + n))`` at update ``n``, so a short run is not dominated by its
start. `torch.optim.swa_utils.AveragedModel` keeps the copy and the update count; only the warm-up is
ours (its EMA helper has a fixed decay).

In a checkpoint, ``models.generator`` holds the averaged weights (what every reader uses for
inference), ``training_generator`` the weights the optimiser trains and ``ema_updates`` the count,
both only for ``--resume``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warm_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` (1, 2, ...): `decay`, lower while few have been made."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """The averaged copy of `generator` (``module``: eval mode, no gradients)."""

    def __init__(self, generator: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay {decay!r} must be in (0, 1)")
        self.decay, self._weight = decay, 1.0  # weight of the new value in the current update

        def average(avg: torch.Tensor, new: torch.Tensor, _count: torch.Tensor) -> torch.Tensor:
            return torch.lerp(avg, new, self._weight)

        # buffers (fitted, never trained) follow the generator instead of being averaged
        self._averaged = AveragedModel(generator, avg_fn=average, use_buffers=False)
        self._averaged.update_parameters(generator)  # update 0 copies: the average starts at the start
        self.module.requires_grad_(False).eval()

    @property
    def module(self) -> nn.Module:
        return self._averaged.module

    @property
    def updates(self) -> int:
        """Updates after the starting copy."""
        return int(self._averaged.n_averaged) - 1

    def update(self, generator: nn.Module) -> None:
        """Fold the generator's current weights into the average (after each optimiser step)."""
        self._weight = 1.0 - warm_decay(self.decay, self.updates + 1)
        self._averaged.update_parameters(generator)

    def checkpoint_fields(self, generator: nn.Module) -> dict[str, Any]:
        """Checkpoint entries besides ``models``: the trained weights and the update count."""
        return {"training_generator": generator.state_dict(), "ema_updates": self.updates}

    def restore(self, averaged: dict[str, torch.Tensor], updates: int) -> None:
        """Continue a checkpoint's average: its weights (``models.generator``) and ``ema_updates``."""
        self.module.load_state_dict(averaged)
        self._averaged.n_averaged.fill_(updates + 1)


def training_weights(payload: dict[str, Any], role: str) -> dict[str, torch.Tensor]:
    """The weights the optimiser of `role` trained in a checkpoint (for the generator of an averaging
    run these are not the ``models`` entry, which holds the average)."""
    if role == "generator" and "training_generator" in payload:
        return payload["training_generator"]
    return payload["models"][role]
