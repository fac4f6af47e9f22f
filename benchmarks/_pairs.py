"""Shared pieces of the RegGAN and self-inverse experiments: windowed volumes, a short training run on
patches the experiment cuts itself, evaluation in HU, and their command-line options.

The objective and its optimisers are built by the training loop's own `build_training_objective` and
`build_optimisers` from a `Config`, and each step is the loop's `train_step`: the experiments differ from
``revgan-med train`` only in where the patches come from (misaligned on purpose, or cut from one scan's
training region), which a datalist cannot express.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from revgan_med.config import config_from_dict
from revgan_med.data.transforms import CTWindow
from revgan_med.evaluation import compute_metrics
from revgan_med.inference import sliding_window_predict
from revgan_med.io import load_volume
from revgan_med.training.distributed import init_distributed
from revgan_med.training.loop import build_optimisers, build_training_objective, train_step

# the real scans beside the repository (../shared/data); every script takes its own path option too
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

Batch = dict[str, torch.Tensor]


def load_windowed(path: str | Path, window: CTWindow) -> np.ndarray:
    """A CT volume (NIfTI file or DICOM folder) in network units [-1, 1], shape (1, X, Y, Z) float32."""
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
    loss: dict[str, Any],
    residual: bool = True,
    linear_kernel: Sequence[int] | None = None,
    lr: float = 2e-4,
) -> tuple[nn.Module, dict[str, torch.optim.Optimizer]]:
    """A registered objective with a one-channel generator, its discriminators and Adam per role, as
    ``revgan-med train`` builds them from a config (`loss`: the config's ``loss`` section).

    `residual` builds the generator as input + learned correction (identity when untrained), as
    ``model.residual`` does in the configs; `linear_kernel` adds the linear paths (zero at the start;
    `fit` can give them their least-squares start).
    """
    config = config_from_dict({
        "task": "ct-kernel", "objective": objective, "loss": loss,
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


def add_training_run_arguments(
    parser: argparse.ArgumentParser, *, steps: int, lr: float, linear_kernel: list[int] | None = None
) -> None:
    """The options shared by the experiments that train small models (`reggan`, `selfinverse`)."""
    parser.add_argument(
        "--steps", type=int, default=steps, help="training steps per run (default: %(default)s)"
    )
    parser.add_argument("--width", type=int, default=8, help="generator width (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=lr, help="Adam learning rate (default: %(default)s)")
    parser.add_argument(
        "--residual", action=argparse.BooleanOptionalAction, default=True,
        help="generator = input + learned correction, identity when untrained (default: on)",
    )  # fmt: skip
    parser.add_argument(
        "--linear-kernel", type=_kernel, default=linear_kernel, metavar="X,Y,Z",
        help=f"the generator's linear paths, model.linear_kernel, or none (default: {linear_kernel})",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")


def _kernel(text: str) -> list[int] | None:
    if text.lower() == "none":
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z odd integers, got {text!r}") from None
