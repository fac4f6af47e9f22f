"""Shared pieces of the issue-7 experiments: windowed volumes, a short training run, evaluation in HU.

The experiments train the project's own objectives (`build_objective`, `train_step` of the training
loop) on patches cut from one real scan and evaluate the generator on a held-out slab of it, so they are
small enough for a CPU and exercise exactly the code a `revgan-med train` run uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from revgan_med.config import LossConfig
from revgan_med.data.transforms import CTWindow
from revgan_med.evaluation import compute_metrics

Batch = dict[str, torch.Tensor]


def load_windowed(path: str | Path, window: CTWindow) -> np.ndarray:
    """A CT volume (NIfTI file or DICOM folder) in network units [-1, 1], shape (1, X, Y, Z) float32."""
    from revgan_med.io import load_volume

    array, _ = load_volume(path)
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D CT volume, got shape {array.shape}")
    return window.normalize(np.asarray(array, dtype=np.float32))[None].astype(np.float32)


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
    loss: LossConfig,
    residual: bool = True,
    linear_kernel: Sequence[int] | None = None,
) -> nn.Module:
    """A registered objective with a one-channel generator and the discriminators it asks for.

    `residual` builds the generator as input + learned correction (identity when untrained), as
    ``model.residual`` does in the configs; `linear_kernel` adds the linear paths (zero at the start;
    `fit` can give them their least-squares start).
    """
    from revgan_med.networks import build_discriminator, build_generator
    from revgan_med.training.objectives import OBJECTIVES, build_objective

    net = build_generator(
        generator,
        in_channels=1,
        out_channels=1,
        width=width,
        depth=depth,
        memory_saving=False,
        residual=residual,
        linear_kernel=linear_kernel,
    )
    needed = OBJECTIVES.get(objective).discriminator_channels(1, loss.gan)
    discs = {r: build_discriminator("patchgan3d", in_channels=c, width=disc_width) for r, c in needed.items()}
    return build_objective(objective, generator=net, discriminators=discs, loss=loss)


def fit(
    objective: nn.Module,
    batches: Callable[[int], Batch],
    *,
    steps: int,
    lr: float,
    device: torch.device,
    linear_fit_batches: int = 0,
    log: Callable[[str], None] = print,
) -> float:
    """Train `objective` for `steps` iterations of the loop's `train_step` (Adam per role, constant lr).

    `batches(step)` returns the step's batch. With `linear_fit_batches`, the generator's linear paths
    first get their least-squares start from that many further batches, as ``revgan-med train`` does.
    Returns the wall-clock seconds.
    """
    from revgan_med.training.distributed import init_distributed
    from revgan_med.training.loop import train_step

    objective.to(device).train()
    modules = objective.modules_by_role()
    optimizers = {r: torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, 0.999)) for r, m in modules.items()}
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    context = init_distributed(str(device.type))
    start = time.perf_counter()
    if linear_fit_batches:
        extra = range(steps, steps + linear_fit_batches)
        objective.fit_linear_paths({k: v.to(device) for k, v in batches(i).items()} for i in extra)
    for step in range(steps):
        batch = {k: v.to(device) for k, v in batches(step).items()}
        losses = train_step(
            objective, batch, optimizers=optimizers, scaler=scaler, amp_dtype=None, context=context
        )
        if (step + 1) % max(1, steps // 4) == 0:
            text = ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
            log(f"  step {step + 1}/{steps} ({time.perf_counter() - start:.0f} s): {text}")
    return time.perf_counter() - start


def translate(
    fn: Callable[[torch.Tensor], torch.Tensor],
    volume: np.ndarray,
    device: torch.device,
    *,
    context: Sequence[int],
) -> np.ndarray:
    """Apply a generator direction to a ``(1, X, Y, Z)`` volume by sliding windows of the training patch size.

    As ``revgan-med infer``: each half-size centre is predicted from a `context` window around it, so
    instance normalisation sees patch-sized inputs as in training.
    """
    from revgan_med.tiling import sliding_window_predict

    target = [max(1, c // 2) for c in context]
    volume_t = torch.from_numpy(np.ascontiguousarray(volume))[None]
    out = sliding_window_predict(fn, volume_t, target_size=target, context_size=list(context), device=device)
    return out[0].numpy()


def psnr_hu(
    prediction: np.ndarray, reference: np.ndarray, window: CTWindow, metric_window: CTWindow | None = None
) -> float:
    """PSNR (dB) of two `window` network-unit volumes in HU, clipped to `metric_window` (default
    `window`), data range = its width."""
    metric = metric_window or window
    pred, ref = (np.clip(window.denormalize(v)[0], metric.lo, metric.hi) for v in (prediction, reference))
    return compute_metrics(pred, ref, data_range=metric.hi - metric.lo)["psnr"]


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters; modules shared between roles are counted once."""
    return sum(p.numel() for p in module.parameters())
