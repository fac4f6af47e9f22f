"""Inference on arrays: sliding-window reconstruction of whole volumes (thesis ``000_*`` §5.4–5.5).

`load_model` rebuilds a checkpoint's generator (`revgan_med.checkpoints`); `infer_volume` translates one
volume in scanner units; reading and writing files, folders and shards is `revgan_med.inference_files`.
Each target window is predicted from a context window centred on it (`revgan_med.tiling`); only
the centres are kept, so every voxel is predicted exactly once and there are no seams. By default
the windows are as large as a voxel budget allows, with the generator's receptive radius as margin,
so a scan costs about one pass of the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revgan_med.checkpoints import Model, load_checkpoint, model_from_checkpoint, require_keys
from revgan_med.data.degradation import input_support, thick_slice, upsample_to_hr
from revgan_med.data.transforms import CTWindow, DTIScale, intensity_from_dict
from revgan_med.runtime import resolve_device
from revgan_med.tasks import BORDER_PADDING, TASK_CHANNELS
from revgan_med.tiling import predict_volume, sliding_window_predict


def load_model(checkpoint: str | Path, *, device: str | torch.device | None = "auto") -> Model:
    """Read a checkpoint or exported model file (``weights_only``); its generator on `device`, eval mode."""
    run_device = resolve_device(device)
    if run_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every window has the same shape: tune the kernels once
    payload = load_checkpoint(checkpoint, exported_ok=True)
    try:
        require_keys(payload)
        return model_from_checkpoint(payload, run_device)
    except ValueError as exc:  # missing keys, invalid config, weights that do not fit: name the file
        raise ValueError(f"{checkpoint}: {exc}") from None


@dataclass
class InferenceResult:
    """Output volume in scanner units (HU for CT) with its affine, and the optional consistency map.

    `consistency` is |G(F(x)) − x| per voxel in scanner units on the grid the model runs on
    (`consistency_affine`; the HR grid for super-resolution), None unless asked for. Within the
    model's receptive field of the volume border it is not zero even for an exact inverse: G sees
    padding of F(x) there, not F of the padded x.
    """

    array: np.ndarray
    affine: np.ndarray
    consistency: np.ndarray | None = None
    consistency_affine: np.ndarray | None = None


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """(x, y, z[, c]) → (1, C, X, Y, Z)."""
    chans = array[..., None] if array.ndim == 3 else array
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(chans, -1, 0)))[None].float()


def _to_array(tensor: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """(1, C, X, Y, Z) → the layout of `like` ((x, y, z) or (x, y, z, c))."""
    array = np.moveaxis(tensor[0].cpu().numpy(), 0, -1)
    return array[..., 0] if like.ndim == 3 else array


def infer_volume(
    model: Model,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    direction: str = "forward",
    target_size: int | Sequence[int] | None = None,
    context_size: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    amp: bool = False,
    keep_out_of_window: bool = True,
    consistency: bool = False,
    channels_last: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> InferenceResult:
    """Translate one volume (x, y, z[, c]) in scanner units; returns the output in scanner units.

    Forward (X→Y) in super-resolution: `array` is the acquired thick-slice scan; it is upsampled to
    the HR grid exactly inverse to ``thick_slice`` (`upsample_to_hr` with the training mode) and the
    model runs there, so the output lies on the HR grid. Inverse (Y→X) in super-resolution: the
    model's inverse runs on the HR input and the result is block-averaged by ``thick_slice`` onto the
    LR grid — the same degradation the training pairs were made with. CT voxels whose input lies
    outside the training window (bone, metal, air below it) keep the input value when
    `keep_out_of_window` (the model only saw clipped values there). Windows default to the
    checkpoint's (`revgan_med.tiling.predict_volume`: automatic ones shrink where the accelerator runs
    out of memory), batch size to its `infer.batch_size`; `progress(done, total)` is called after
    every batch of windows.
    """
    if direction not in ("forward", "inverse"):
        raise ValueError(f"direction {direction!r}: expected forward or inverse")
    channels = TASK_CHANNELS[model.task]
    grid, grid_affine = np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64)
    if grid.shape[3:] != (() if channels == 1 else (channels,)):
        raise ValueError(
            f"{model.task} expects (x, y, z{'' if channels == 1 else f', {channels}'}), got {grid.shape}"
        )
    super_res = any(f > 1 for f in model.factors)
    up = model.factors if super_res and direction == "forward" else (1, 1, 1)
    brain = input_support(grid, grid_affine, up) if channels > 1 else None  # where the DTI scale is fitted
    if super_res and direction == "forward":
        grid, grid_affine = upsample_to_hr(grid, grid_affine, model.factors, mode=model.upsample)
    mapping = intensity_from_dict(model.intensity)
    if isinstance(mapping, DTIScale) and mapping.scales is None:
        mapping = mapping.fit(grid, brain)  # dMRI scales come from the input itself, as in training
    batch_size = model.batch_size if batch_size is None else batch_size
    sw: dict[str, Any] = {"batch_size": batch_size, "device": model.device, "amp": amp,
                          "padding_mode": BORDER_PADDING[model.task],  # the volume beyond its border
                          "channels_last": channels_last, "progress": progress}  # fmt: skip
    step, back = model.generator, model.generator.inverse
    if direction == "inverse":
        step, back = back, step
    x = _to_tensor(mapping.normalize(grid))
    y, (target, context) = predict_volume(
        step, x, patch_size=model.patch_size, margin=model.margin,
        target_size=model.target_size if target_size is None else target_size,
        context_size=model.context_size if context_size is None else context_size, **sw,
    )  # fmt: skip
    sw.update(target_size=target, context_size=context)  # the consistency pass: the windows that fitted
    out = mapping.denormalize(_to_array(y, grid))
    if keep_out_of_window and isinstance(mapping, CTWindow):
        outside = (grid < mapping.lo) | (grid > mapping.hi)
        out[outside] = grid[outside]
    result = InferenceResult(out, grid_affine)
    if consistency:
        cycled = mapping.denormalize(_to_array(sliding_window_predict(back, y, **sw), grid))
        result.consistency = np.abs(cycled - mapping.denormalize(_to_array(x, grid)))
        result.consistency_affine = grid_affine
    if super_res and direction == "inverse":
        result.array, result.affine = thick_slice(out, grid_affine, model.factors)
    return result


def consistency_summary(diff: np.ndarray, *, threshold: float = 50.0) -> dict[str, float]:
    """Mean, 95th percentile, max of a consistency map and the fraction of voxels above `threshold`."""
    return {
        "mean": float(diff.mean()),
        "p95": float(np.percentile(diff, 95)),
        "max": float(diff.max()),
        f"frac_gt_{threshold:g}": float((diff > threshold).mean()),
    }
