"""Short training runs on patches the caller cuts itself: the research experiments in ``benchmarks/``
and the device check (`revgan_med.benchmarks.gpu`) train small models this way.

The objective and its optimisers are built by the training loop's own `build_training_objective` and
`build_optimisers` from a `Config`, and each step is the loop's `train_step`, so these runs differ from
``revgan-med train`` only in where the patches come from (misaligned on purpose, or cut from one
scan's training region), which a datalist cannot express.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from revgan_med.config import config_from_dict
from revgan_med.data.transforms import CTWindow
from revgan_med.training.distributed import init_distributed
from revgan_med.training.loop import build_optimisers, build_training_objective, train_step

Batch = dict[str, torch.Tensor]


def random_origin(
    rng: np.random.Generator, bounds: Sequence[tuple[int, int]], size: Sequence[int]
) -> list[int]:
    """Random corner of a `size` box inside ``[lo, hi)`` per axis."""
    return [int(rng.integers(lo, hi - s + 1)) for (lo, hi), s in zip(bounds, size, strict=True)]


def cut(volume: np.ndarray, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The ``(C, *size)`` box of a ``(C, X, Y, Z)`` volume at `origin`."""
    return volume[(slice(None), *(slice(o, o + s) for o, s in zip(origin, size, strict=True)))]


def build(
    objective: str,
    *,
    generator: str,
    width: int,
    depth: int,
    disc_width: int,
    loss: dict[str, Any],
    patch_size: Sequence[int],
    residual: bool = True,
    linear_kernel: Sequence[int] | None = None,
    lr: float = 2e-4,
) -> tuple[nn.Module, dict[str, torch.optim.Optimizer]]:
    """A registered objective with a one-channel generator, its discriminators and Adam per role, as
    ``revgan-med train`` builds them from a config (`loss`: the config's ``loss`` section;
    `patch_size`: the training patches' (x, y, z), which the PatchGAN's layout adapts to).

    `residual` builds the generator as input + learned correction (identity when untrained), as
    ``model.residual`` does in the configs; `linear_kernel` adds the linear paths (zero at the start;
    `fit` can give them their least-squares start).
    """
    config = config_from_dict({
        "task": "ct-kernel", "objective": objective, "loss": loss,
        "data": {"patch_size": [int(v) for v in patch_size]},
        "model": {"generator": generator, "width": width, "depth": depth, "disc_width": disc_width,
                  "memory_saving": False, "residual": residual,
                  "linear_kernel": None if linear_kernel is None else list(linear_kernel)},
        "train": {"lr": lr, "betas": [0.5, 0.999]},
    })  # fmt: skip
    built = build_training_objective(config)
    optimizers, _ = build_optimisers(built, config)  # no scheduler steps: a constant learning rate
    return built, optimizers


def fit(
    objective: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    batches: Callable[[int], Batch],
    *,
    steps: int,
    device: torch.device,
    linear_fit_batches: int = 0,
    log: Callable[[str], None] = print,
) -> float:
    """Train `objective` (from `build`) for `steps` iterations of the loop's `train_step`.

    `batches(step)` returns the step's batch. With `linear_fit_batches`, the generator's linear paths
    first get their least-squares start from that many further batches, as ``revgan-med train`` does.
    Returns the wall-clock seconds.
    """
    objective.to(device).train()  # moves the parameters in place: the optimisers keep them
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    context = init_distributed(str(device.type))
    start = time.perf_counter()
    if linear_fit_batches:
        extra = range(steps, steps + linear_fit_batches)
        fit_batches = ({k: v.to(device) for k, v in batches(i).items()} for i in extra)
        objective.fit_linear_paths(fit_batches, clip=CTWindow.clipped_bounds)  # windowed CT, as in `train`
    for step in range(steps):
        batch = {k: v.to(device) for k, v in batches(step).items()}
        losses = train_step(
            objective, batch, optimizers=optimizers, scaler=scaler, amp_dtype=None, context=context
        )
        if (step + 1) % max(1, steps // 4) == 0:
            text = ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
            log(f"  step {step + 1}/{steps} ({time.perf_counter() - start:.0f} s): {text}")
    return time.perf_counter() - start
