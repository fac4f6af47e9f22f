"""Per-voxel reliability maps for model outputs, and how well a map predicts the actual error.

A purely reversible generator inverts itself exactly, so its |G(F(x)) − x| is zero up to rounding and
window borders whatever F(x) gets wrong; only the residual connection and linear paths of the packaged
configs make it informative. `flip_disagreement` does not depend on the architecture: how much the
output changes when the same scan is presented mirrored or with x and y swapped. The network is not
equivariant to these, and it disagrees with itself most where it is unsure (edges, fine structure).
`calibration` scores any map against |prediction − reference| (measured in README, "Error map").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from revgan_med.checkpoints import Model
from revgan_med.data.sampling import xy_alike
from revgan_med.evaluation import match_cases
from revgan_med.inference import infer_volume
from revgan_med.io import load_volume

Transform = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
TOP_FRACTION = 0.05
BLOCK = 8


def _swap_xy(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, 0, 1))


def tta_transforms(factors: Sequence[int], patch_size: Sequence[int]) -> dict[str, Transform]:
    """Mirrorings of each spatial axis, and the x↔y swap where the model treats x and y alike.

    Each is (apply, undo) on (x, y, z[, c]) arrays. Mirroring commutes with the centre-aligned
    thick-slice model of super-resolution (whole blocks map onto whole blocks), so every transformed
    prediction lies on the same output grid as the plain one.
    """
    transforms: dict[str, Transform] = {}
    for axis, name in enumerate("xyz"):
        flip = lambda a, ax=axis: np.flip(a, ax).copy()  # noqa: E731
        transforms[f"flip_{name}"] = (flip, flip)
    if xy_alike(factors, patch_size):
        transforms["swap_xy"] = (_swap_xy, _swap_xy)
    return transforms


def flip_predictions(
    model: Model, array: np.ndarray, affine: np.ndarray, prediction: np.ndarray, **options: Any
) -> np.ndarray:
    """`prediction` and the predictions of the mirrored / x↔y-swapped inputs, each mapped back,
    stacked along a new first axis.

    `array` (x, y, z), `affine` and `options` are what `infer_volume` got for `prediction`. Costs one
    inference per transform (3–4). Their spread is the error map (`flip_disagreement`), their mean
    the geometric self-ensemble (``infer --ensemble``).
    """
    if array.ndim != 3:
        raise ValueError(
            "mirroring a diffusion tensor volume also changes its components: the error map and the "
            "ensemble are for scalar volumes only"
        )
    options = {k: v for k, v in options.items() if k != "consistency"}

    def predict(a: np.ndarray) -> np.ndarray:
        return infer_volume(model, a, affine, **options).array

    return transformed_outputs(predict, array, prediction, tta_transforms(model.factors, model.patch_size))


def flip_disagreement(
    model: Model, array: np.ndarray, affine: np.ndarray, prediction: np.ndarray, **options: Any
) -> np.ndarray:
    """Per-voxel standard deviation of `flip_predictions` (the prediction's shape and units)."""
    return flip_predictions(model, array, affine, prediction, **options).std(axis=0)


def transformed_outputs(
    predict: Callable[[np.ndarray], np.ndarray], array: np.ndarray, prediction: np.ndarray,
    transforms: dict[str, Transform],
) -> np.ndarray:  # fmt: skip
    """`prediction` and ``undo(predict(apply(array)))`` for each transform, stacked (float32)."""
    outputs = [prediction.astype(np.float32)]
    outputs += [undo(predict(apply(array))).astype(np.float32) for apply, undo in transforms.values()]
    return np.stack(outputs)


def _block_means(volume: np.ndarray, block: int) -> np.ndarray:
    """Mean over non-overlapping `block`³ blocks (the remainder at the far edges is left out)."""
    n = [s // block for s in volume.shape[:3]]
    if min(n) < 1:
        raise ValueError(f"volume {volume.shape} is smaller than one {block}³ block")
    v = volume[: n[0] * block, : n[1] * block, : n[2] * block]
    return v.reshape(n[0], block, n[1], block, n[2], block).mean(axis=(1, 3, 5)).ravel()


def calibration(
    error_map: np.ndarray, prediction: np.ndarray, reference: np.ndarray, *,
    window: Sequence[float] | None = None, top: float = TOP_FRACTION, block: int = BLOCK,
) -> dict[str, float]:  # fmt: skip
    """How well `error_map` predicts |prediction − reference| (both clipped to `window` when given).

    ``top_mae`` / ``rest_mae``: mean error in the `top` fraction of voxels the map flags most and in
    the others; ``ratio`` their quotient (≥ 2 is this project's bar); ``spearman``: rank correlation
    of map and error over `block`³ block means (where the error is, not which single voxel); NaN
    when either is constant.
    """
    if not error_map.shape[:3] == prediction.shape[:3] == reference.shape[:3]:
        raise ValueError(
            f"shapes differ: error map {error_map.shape}, prediction {prediction.shape}, "
            f"reference {reference.shape}"
        )
    pred, ref = prediction.astype(np.float64), reference.astype(np.float64)
    if window is not None:
        pred, ref = np.clip(pred, *window), np.clip(ref, *window)
    error = np.abs(pred - ref)
    emap = error_map.astype(np.float64)
    if error.ndim == 4:
        error = error.mean(axis=-1)
    if emap.ndim == 4:
        emap = emap.mean(axis=-1)
    flat_map, flat_err = emap.ravel(), error.ravel()
    k = max(1, int(round(top * flat_map.size)))
    flagged = np.zeros(flat_map.size, bool)
    flagged[np.argpartition(-flat_map, k - 1)[:k]] = True  # exactly k voxels, ties broken arbitrarily
    top_mae, rest_mae = float(flat_err[flagged].mean()), float(flat_err[~flagged].mean())
    blocks = _block_means(emap, block), _block_means(error, block)
    constant = min(np.ptp(b) for b in blocks) == 0  # no ranking to correlate: undefined, not an error
    rho = float("nan") if constant else spearmanr(*blocks).statistic
    return {
        "top_mae": top_mae,
        "rest_mae": rest_mae,
        "ratio": top_mae / rest_mae if rest_mae > 0 else float("inf"),
        "spearman": float(rho),
    }


def calibrate_files(
    error_map: str | Path, prediction: str | Path, reference: str | Path, *, window: Sequence[float] | None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """`calibration` per case of files, or of folders matched by case name → (rows, [(case, problem)])."""
    cases, failed = match_cases(prediction, reference, input=error_map)
    rows = []
    for case in cases:
        try:
            volumes = [load_volume(p)[0] for p in (case.input, case.prediction, case.reference)]
            rows.append({"case": case.name, **calibration(*volumes, window=window)})
        except (ValueError, OSError) as exc:
            failed.append((case.name, str(exc).splitlines()[0]))
    return rows, failed
