"""Evaluation: MAE / PSNR / SSIM (3D) in a stated intensity window (thesis ``000_*`` §6.2–6.4)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

from revgan_med.data.degradation import upsample_to_hr
from revgan_med.data.transforms import interior_mask, parse_window
from revgan_med.figures import comparison_figure
from revgan_med.io import discover_volumes, load_volume
from revgan_med.io.atomic import atomic_write_text
from revgan_med.io.checks import require_finite
from revgan_med.tasks import DEFAULT_WINDOW

# SSIM as Wang et al. 2004 and MONAI's SSIMMetric: Gaussian window σ = 1.5 (11 voxels), population covariance
SSIM_SIGMA = 1.5


def _as_float(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def ssim_3d(
    prediction: np.ndarray,
    reference: np.ndarray,
    *,
    data_range: float,
    mask: np.ndarray | None = None,
    channel_axis: int | None = None,
) -> float:
    """Mean 3D SSIM (scikit-image, Gaussian σ = 1.5); over `mask` when given.

    Like scikit-image, the border half-window is left out of the mean (its local statistics come
    from padding). Volumes thinner than the 11-voxel window crop a smaller border (the largest odd
    window that fits).
    """
    prediction, reference = _as_float(prediction), _as_float(reference)
    spatial = [
        n
        for i, n in enumerate(prediction.shape)
        if channel_axis is None or i != channel_axis % prediction.ndim
    ]
    win = 11  # scikit-image's Gaussian window (σ = 1.5 truncated at 3.5σ), or the largest odd that fits
    if win > min(spatial):
        win = min(spatial) - (1 - min(spatial) % 2)
        if win < 3:
            raise ValueError(f"SSIM needs at least 3 voxels along every axis, got shape {prediction.shape}")
    _, ssim_map = structural_similarity(
        prediction,
        reference,
        data_range=data_range,
        channel_axis=channel_axis,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        win_size=win,
        use_sample_covariance=False,
        full=True,
    )
    if channel_axis is not None:
        ssim_map = ssim_map.mean(axis=channel_axis)
    keep = np.zeros(ssim_map.shape, dtype=bool)
    half = (win - 1) // 2
    keep[tuple(slice(half, n - half) for n in ssim_map.shape)] = True
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    if not keep.any():
        raise ValueError("SSIM: the mask leaves no voxel away from the volume border")
    return float(ssim_map[keep].mean())


def compute_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    *,
    data_range: float,
    mask: np.ndarray | None = None,
    channel_axis: int | None = None,
) -> dict[str, float]:
    """MAE, RMSE, PSNR (dB) and 3D SSIM of `prediction` against `reference` (same shape).

    Arrays are (X, Y, Z), or have one channel axis named by `channel_axis`; `mask` is spatial
    (X, Y, Z) and restricts every metric to its voxels. Values are used as given: clip both to
    the evaluation window first (`evaluate_volumes` does), with `data_range` = window width.
    """
    prediction, reference = _as_float(prediction), _as_float(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    if prediction.ndim != 3 + (channel_axis is not None):
        raise ValueError(f"expected a 3D volume (plus channel_axis), got shape {prediction.shape}")
    error = prediction - reference
    if channel_axis is not None:
        error = np.moveaxis(error, channel_axis, -1)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != error.shape[:3]:
            raise ValueError(f"mask shape {mask.shape} != volume shape {error.shape[:3]}")
        if not mask.any():
            raise ValueError("mask is empty")
        error = error[mask]
    mse = float(np.mean(error**2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))
    return {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(mse)),
        "psnr": psnr,
        "ssim": ssim_3d(prediction, reference, data_range=data_range, mask=mask, channel_axis=channel_axis),
    }


BASELINES = ("identity", "trilinear", "tricubic")


def baseline_volume(
    name: str, lr: np.ndarray, lr_affine: np.ndarray, *, factors: Sequence[int], hr_shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """What one would do without the model: ``identity`` (nearest, the input unchanged on the HR
    grid), ``trilinear`` or ``tricubic`` (centre-aligned) upsampling of `lr` → (array, HR affine)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINES)}")
    mode = "nearest" if name == "identity" else name
    return upsample_to_hr(lr, lr_affine, factors, mode=mode, hr_shape=hr_shape[:3])


@dataclass
class Case:
    """One evaluation case: paths to its volumes (input and mask optional)."""

    name: str
    prediction: Path
    reference: Path
    input: Path | None = None
    mask: Path | None = None


def match_cases(
    prediction: str | Path,
    reference: str | Path,
    *,
    input: str | Path | None = None,
    mask: str | Path | None = None,
) -> tuple[list[Case], list[tuple[str, str]]]:
    """Pair files, or the scans of folders by case name → (cases, [(name, problem)] for unmatched)."""
    paths = {"prediction": prediction, "reference": reference, "input": input, "mask": mask}
    if not Path(prediction).is_dir():
        return [Case(Path(prediction).name.split(".")[0], **{k: v and Path(v) for k, v in paths.items()})], []
    found = {
        k: {r.name: Path(r.path) for r in discover_volumes(Path(v))}
        for k, v in paths.items()
        if v is not None
    }
    cases, missing = [], []
    for name in sorted(found["prediction"]):
        lacking = [k for k in found if name not in found[k]]
        if lacking:
            missing.append((name, f"no {' / '.join(lacking)} volume named {name!r}"))
            continue
        cases.append(Case(name, **{k: found[k][name] for k in found}))
    missing += [
        (name, "no prediction for this reference")
        for name in sorted(set(found["reference"]) - set(found["prediction"]))
    ]
    return cases, missing


def _check_grid(
    path: Path, affine: np.ndarray, shape: tuple, ref_affine: np.ndarray, ref_shape: tuple
) -> None:
    if shape[:3] != ref_shape[:3] or not np.allclose(affine, ref_affine, atol=1e-3):
        raise ValueError(
            f"{path}: grid {shape[:3]} does not match the reference's {ref_shape[:3]} (shape or affine)"
        )


def evaluate_case(
    case: Case,
    *,
    window: tuple[float, float] | None,
    baselines: Sequence[str] = (),
    factors: Sequence[int] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], np.ndarray]:
    """Metrics of the prediction (and `baselines` from the case's input) against the reference.

    CT: values clipped to `window`, ``data_range`` = its width. Without a window (dMRI) the range
    is the reference's (inside the mask). With a mask also ``rmse_interior``: RMSE in the mask
    eroded by 5³ (§6.4). `factors` default: reference shape // input shape. Returns the rows (one
    per method), the volumes (clipped) for figures, and the reference affine.
    """
    reference, ref_affine = load_volume(case.reference)
    prediction, pred_affine = load_volume(case.prediction)
    require_finite(reference, case.reference)  # a NaN would turn every metric (and the mean) into nan
    require_finite(prediction, case.prediction)
    _check_grid(case.prediction, pred_affine, prediction.shape, ref_affine, reference.shape)
    volumes = {"prediction": prediction}
    if case.input is not None:
        lr, lr_affine = load_volume(case.input)
        require_finite(lr, case.input)
        if factors is None:
            factors = [max(1, r // l) for r, l in zip(reference.shape[:3], lr.shape[:3], strict=True)]
        for name in ("identity", *[b for b in baselines if b != "identity"]):
            volume, affine = baseline_volume(name, lr, lr_affine, factors=factors, hr_shape=reference.shape)
            _check_grid(case.input, affine, volume.shape, ref_affine, reference.shape)
            volumes["input" if name == "identity" else name] = volume
        if "identity" in baselines:
            volumes["identity"] = volumes["input"]
    elif baselines:
        raise ValueError(f"{case.prediction}: baselines need the input volume (--input)")
    mask = None
    if case.mask is not None:
        mask = load_volume(case.mask)[0] > 0
        if mask.shape != reference.shape[:3]:
            raise ValueError(f"{case.mask}: mask shape {mask.shape} != reference {reference.shape[:3]}")
    if window is not None:
        volumes = {k: np.clip(v, *window) for k, v in volumes.items()}
        reference, data_range = np.clip(reference, *window), window[1] - window[0]
    else:
        values = reference[mask] if mask is not None else reference
        data_range = float(values.max() - values.min()) or 1.0
    channel_axis = -1 if reference.ndim == 4 else None
    rows = []
    for method in ("prediction", *baselines):
        row: dict[str, Any] = {"case": case.name, "method": method}
        row.update(
            compute_metrics(
                volumes[method], reference, data_range=data_range, mask=mask, channel_axis=channel_axis
            )
        )
        if mask is not None:
            inner = interior_mask(mask)
            err = (
                np.moveaxis(volumes[method] - reference, channel_axis, -1)
                if channel_axis
                else volumes[method] - reference
            )
            row["rmse_interior"] = float(np.sqrt(np.mean(err[inner] ** 2))) if inner.any() else float("nan")
        rows.append(row)
    return rows, {**volumes, "reference": reference}, ref_affine


METRICS = ("mae", "rmse", "psnr", "ssim", "rmse_interior")


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of every metric per method → rows with case ``mean`` / ``std``."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        metrics = [m for m in METRICS if m in sel[0]]
        with np.errstate(invalid="ignore"):  # the std of infinite PSNRs (identical volumes) is nan
            for stat, fn in (("mean", np.mean), ("std", np.std)):
                out.append(
                    {"case": stat, "method": method, **{m: float(fn([r[m] for r in sel])) for m in metrics}}
                )
    return out


@dataclass
class EvaluationReport:
    """Per-case rows, the mean ± std rows, and (case, message) for cases that could not be evaluated."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def evaluate_volumes(
    prediction: str | Path,
    reference: str | Path,
    *,
    input: str | Path | None = None,
    mask: str | Path | None = None,
    window: str | Sequence[float] | None = DEFAULT_WINDOW,
    baselines: Sequence[str] = (),
    factors: Sequence[int] | None = None,
    output: str | Path | None = None,
    figure: str | Path | None = None,
) -> EvaluationReport:
    """Evaluate predictions against references (files, or folders matched by case name).

    Writes `output` (CSV: per-case rows, then mean and std per method) and `figure` (PNG; for
    several cases one ``<stem>_<case>.png`` each) when given. `window` None for dMRI (no clipping).
    """
    lo_hi = None if window is None else parse_window(window)
    for name in baselines:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINES)}")
    cases, missing = match_cases(prediction, reference, input=input, mask=mask)
    report = EvaluationReport(failed=list(missing))
    from tqdm import tqdm

    for case in tqdm(cases, desc="evaluate", unit="case", disable=len(cases) < 2):
        try:
            rows, volumes, affine = evaluate_case(case, window=lo_hi, baselines=baselines, factors=factors)
        except (ValueError, OSError) as exc:
            report.failed.append((case.name, str(exc).splitlines()[0]))
            continue
        report.rows += rows
        if figure is not None:
            path = Path(figure)
            if len(cases) > 1:
                path = path.with_name(f"{path.name.split('.')[0]}_{case.name}.png")
            comparison_figure(volumes, path, window=lo_hi, title=case.name, affine=affine)
    report.summary = summarize(report.rows) if report.rows else []
    if output is not None:
        write_csv(report.rows + report.summary, output)
    return report


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Rows (dicts) → CSV with the columns in first-seen order, written atomically."""
    import csv
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    atomic_write_text(path, buffer.getvalue())


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of metric rows."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [
        [f"{r.get(c, ''):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
