"""The notebook surface: load a model, translate a volume, evaluate it against a reference.

`import revgan_med` exposes these three (loaded on first use, so the command line stays fast);
everything else stays importable from its module but is not the advertised surface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from revgan_med.checkpoints import Model
from revgan_med.data.transforms import parse_window
from revgan_med.errormap import flip_predictions
from revgan_med.evaluation import compute_metrics
from revgan_med.inference import infer_volume, load_model
from revgan_med.inference_files import derived_description
from revgan_med.io import load_volume, save_volume

__all__ = ["Model", "Translation", "evaluate", "load_model", "translate"]


@dataclass
class Translation:
    """`array` (scanner units, HU for CT) on the grid `affine`; `error_map` (same grid, same units)
    when asked for: where the output is least reliable (README, "Error map")."""

    array: np.ndarray
    affine: np.ndarray
    error_map: np.ndarray | None = None


def _volume(volume: str | Path | np.ndarray, affine: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(volume, (str, Path)):
        return load_volume(volume)
    if affine is None:
        raise ValueError("an array needs its 4x4 affine (voxel -> RAS+ mm)")
    return np.asarray(volume), np.asarray(affine, dtype=np.float64)


def translate(
    model: Model, volume: str | Path | np.ndarray, affine: np.ndarray | None = None, *,
    direction: str = "forward", output: str | Path | None = None, error_map: bool = False,
    ensemble: bool | None = None, **options: Any,
) -> Translation:  # fmt: skip
    """Translate a scan (a NIfTI file / DICOM folder, or an (x, y, z[, c]) array with its affine).

    `direction` ``forward`` (X→Y: thick→thin slices, smooth→sharp kernel) or ``inverse``; `options`
    as `revgan_med.inference.infer_volume`. `output` also writes the result (NIfTI, labelled derived).
    `ensemble` returns the mean over the input as given, mirrored and x/y-swapped (``infer --ensemble``;
    None: the checkpoint's ``infer.ensemble``); `error_map` is the spread of the same predictions.
    """
    ensemble = model.ensemble if ensemble is None else ensemble
    array, grid = _volume(volume, affine)
    result = infer_volume(model, array, grid, direction=direction, **options)
    out = Translation(result.array, result.affine)
    if error_map or ensemble:
        flips = flip_predictions(model, array, grid, result.array, direction=direction, **options)
        out.array = flips.mean(axis=0) if ensemble else out.array
        out.error_map = flips.std(axis=0) if error_map else None
    if output is not None:
        description = derived_description(model, direction, ensemble=ensemble)
        save_volume(out.array, out.affine, output, description=description)
    return out


def evaluate(
    prediction: str | Path | np.ndarray | Translation, reference: str | Path | np.ndarray, *,
    window: str | tuple[float, float] | None = "chest-1024", mask: np.ndarray | None = None,
) -> dict[str, float]:  # fmt: skip
    """MAE / RMSE / PSNR / SSIM of a prediction against a reference on the same grid.

    CT: both clipped to `window` (a preset name or (min, max) HU), data range its width; `window`
    None (dMRI) uses the reference's range.
    """
    pred = prediction.array if isinstance(prediction, Translation) else prediction
    pred = load_volume(pred)[0] if isinstance(pred, (str, Path)) else np.asarray(pred)
    ref = load_volume(reference)[0] if isinstance(reference, (str, Path)) else np.asarray(reference)
    channels = -1 if ref.ndim == 4 else None
    if window is None:
        return compute_metrics(pred, ref, data_range=float(ref.max() - ref.min()) or 1.0, mask=mask,
                               channel_axis=channels)  # fmt: skip
    lo, hi = parse_window(window)
    return compute_metrics(np.clip(pred, lo, hi), np.clip(ref, lo, hi), data_range=hi - lo, mask=mask,
                           channel_axis=channels)  # fmt: skip
