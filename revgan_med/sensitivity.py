"""Model-sensitivity analysis of the self-inverse paper (``002_*`` §6): output change for a perturbed input.

For one direction with model f, input x, reference y and a perturbed input x + dx, the paper compares a
quality metric E of the two outputs against the reference: ``dE = |E(f(x + dx), y) - E(f(x), y)|`` — a
model that maps one-to-one reacts more to a change of its input (larger dE = more sensitive). The paper
takes x + dx from another model (the opposite-direction pix2pix output from y); here any perturbed
volume can be given, or seeded Gaussian noise is used. Both directions are analysed: forward (x → y with
the perturbed x) and inverse (y → x with the perturbed y); for a self-inverse model both use the same f.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from revgan_med.data.transforms import CTWindow, intensity_from_dict
from revgan_med.evaluation import compute_metrics
from revgan_med.inference import infer_volume, load_model
from revgan_med.io import load_volume
from revgan_med.tasks import evaluation_window

__all__ = [
    "SENSITIVITY_COLUMNS",
    "gaussian_perturbation",
    "output_sensitivity",
    "sensitivity_analysis",
    "sensitivity_from_files",
]

Translate = Callable[[np.ndarray], np.ndarray]
SENSITIVITY_COLUMNS = (
    "direction",
    "psnr",
    "ssim",
    "mae",
    "d_psnr",
    "d_ssim",
    "d_mae",
    "input_change",
    "output_change",
)


def gaussian_perturbation(volume: np.ndarray, *, std: float, seed: int = 0) -> np.ndarray:
    """`volume` plus seeded Gaussian noise of standard deviation `std` (same units as the volume)."""
    if std <= 0:
        raise ValueError(f"perturbation std must be positive, got {std}")
    noise = np.random.default_rng(seed).normal(0.0, std, size=np.shape(volume))
    return np.asarray(volume, dtype=np.float64) + noise


def output_sensitivity(
    translate: Translate,
    *,
    source: np.ndarray,
    perturbed: np.ndarray,
    reference: np.ndarray,
    data_range: float,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Sensitivity of `translate` at `source` to the change ``perturbed - source`` (one direction).

    Volumes are (X, Y, Z) in the evaluation units (e.g. HU clipped to the window, `data_range` its
    width); the outputs of `translate` must have the shape of `reference` (for super-resolution the
    input is on its own, coarser grid). Returns the metrics of ``f(source)`` against `reference`
    (``psnr``, ``ssim``, ``mae``), the paper's absolute metric changes ``d_psnr``, ``d_ssim``, ``d_mae``
    when the input is perturbed, and the mean absolute input and output changes (``input_change``,
    ``output_change``).
    """
    if np.shape(source) != np.shape(perturbed):
        raise ValueError(
            f"source {np.shape(source)} and perturbed {np.shape(perturbed)} must have the same shape"
        )
    output = np.asarray(translate(source), dtype=np.float64)
    moved = np.asarray(translate(perturbed), dtype=np.float64)
    before = compute_metrics(output, reference, data_range=data_range, mask=mask)
    after = compute_metrics(moved, reference, data_range=data_range, mask=mask)
    changes = {f"d_{k}": abs(after[k] - before[k]) for k in ("psnr", "ssim", "mae")}
    return {
        "psnr": before["psnr"],
        "ssim": before["ssim"],
        "mae": before["mae"],
        **changes,
        "input_change": float(np.mean(np.abs(np.asarray(perturbed, np.float64) - source))),
        "output_change": float(np.mean(np.abs(moved - output))),
    }


def sensitivity_analysis(
    *,
    forward: Translate,
    inverse: Translate,
    source: np.ndarray,
    target: np.ndarray,
    perturbed_source: np.ndarray,
    perturbed_target: np.ndarray,
    data_range: float,
    mask: np.ndarray | None = None,
) -> list[dict[str, float | str]]:
    """Both directions of the §6 analysis; one row per direction (keys: `SENSITIVITY_COLUMNS`).

    ``forward`` maps the source domain to the target domain and is probed at `source` with
    `perturbed_source` against `target`; ``inverse`` the other way round. Pass the same function twice
    for a self-inverse model.
    """
    rows: list[dict[str, float | str]] = []
    for direction, fn, x, dx, y in (
        ("forward", forward, source, perturbed_source, target),
        ("inverse", inverse, target, perturbed_target, source),
    ):
        result = output_sensitivity(fn, source=x, perturbed=dx, reference=y, data_range=data_range, mask=mask)
        rows.append({"direction": direction, **result})
    return rows


def sensitivity_from_files(
    checkpoint: str | Path,
    *,
    source: str | Path,
    reference: str | Path,
    perturbed: str | Path,
    direction: str = "forward",
    window: str | None = None,
    device: str = "auto",
) -> dict[str, float | str]:
    """§6 analysis of a trained checkpoint in one direction, on volumes in scanner units (files).

    `source` is the model's input in `direction`, `reference` its paired ground truth and `perturbed`
    the perturbed input x + dx (the paper: the opposite-direction model's prediction of x). The model
    runs as ``revgan-med infer`` does (`infer_volume`); CT volumes are compared in `window` (default as
    ``revgan-med evaluate --checkpoint``: the checkpoint's own, `evaluation_window`); CT only. Returns
    one row (`SENSITIVITY_COLUMNS`).
    """
    model = load_model(checkpoint, device=device)
    x, affine = load_volume(source)
    dx, _ = load_volume(perturbed)
    y, _ = load_volume(reference)
    if np.ndim(x) != 3:
        raise ValueError(f"{source}: the sensitivity analysis supports single-channel (CT) volumes only")
    if np.shape(dx) != np.shape(x):
        raise ValueError(f"{perturbed}: shape {np.shape(dx)} differs from the input {source} {np.shape(x)}")
    mapping = intensity_from_dict(model.intensity)
    if not isinstance(mapping, CTWindow):
        raise ValueError(f"{checkpoint}: the sensitivity analysis supports CT checkpoints only")
    lo, hi = evaluation_window(model.task, window, (mapping.lo, mapping.hi))

    def clip(volume: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(volume, dtype=np.float64), lo, hi)

    def translate(volume: np.ndarray) -> np.ndarray:
        return clip(infer_volume(model, volume, affine, direction=direction).array)

    try:
        row = output_sensitivity(
            translate, source=clip(x), perturbed=clip(dx), reference=clip(y), data_range=hi - lo
        )
    except ValueError as exc:
        raise ValueError(f"{reference}: {exc}") from None
    return {"direction": direction, **row}
