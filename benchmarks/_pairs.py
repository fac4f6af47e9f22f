"""Shared pieces of the RegGAN and self-inverse experiments: windowed volumes, a short training run on
patches the experiment cuts itself, evaluation in HU, and their command-line options.

Models are built and trained by `revgan_med.training.quickfit` (the training loop's own builders and
`train_step`): the experiments differ from ``revgan-med train`` only in where the patches come from
(misaligned on purpose, or cut from one scan's training region), which a datalist cannot express.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from revgan_med.data.transforms import CTWindow
from revgan_med.evaluation import compute_metrics
from revgan_med.io import load_volume
from revgan_med.tiling import sliding_window_predict

# the real scans beside the repository (../shared/data); every script takes its own path option too
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

def load_windowed(path: str | Path, window: CTWindow) -> np.ndarray:
    """A CT volume (NIfTI file or DICOM folder) in network units [-1, 1], shape (1, X, Y, Z) float32."""
    array, _ = load_volume(path)
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D CT volume, got shape {array.shape}")
    return window.normalize(np.asarray(array, dtype=np.float32))[None].astype(np.float32)


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
