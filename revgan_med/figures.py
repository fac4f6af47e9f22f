"""Comparison figures: coronal and axial slices of input, baselines, prediction, reference and |error|."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from revgan_med.io.atomic import atomic_path


def _plane(volume: np.ndarray, axis: int) -> np.ndarray:
    """The middle slice across `axis` of (x, y, z[, c]) (first channel), oriented for imshow."""
    scalar = volume if volume.ndim == 3 else volume[..., 0]
    index = [slice(None)] * 3
    index[axis] = scalar.shape[axis] // 2
    return scalar[tuple(index)].T  # rows: the later axis (z for coronal, y for axial), origin lower


def comparison_figure(
    volumes: dict[str, np.ndarray],
    path: str | Path,
    *,
    window: tuple[float, float] | None,
    affine: np.ndarray,
    title: str = "",
) -> Path:
    """Write a PNG: one row per view (coronal, axial), one column per volume plus |prediction −
    reference|. `volumes` holds ``prediction`` and ``reference`` and optionally ``input`` and
    baselines, all on the reference grid; images share the `window` grey scale (else the
    reference's range), errors share one colour scale. Pixel aspect follows the voxel spacing.
    """
    from matplotlib.figure import Figure  # renders with Agg; no pyplot, no global backend switch

    order = [k for k in ("input",) if k in volumes]
    order += [k for k in volumes if k not in ("input", "prediction", "reference")]
    order += ["prediction", "reference"]
    lo, hi = (
        window
        if window is not None
        else (float(volumes["reference"].min()), float(volumes["reference"].max()))
    )
    error = np.abs(volumes["prediction"] - volumes["reference"])
    error_max = float(np.percentile(error, 99.5)) or 1.0
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    views = [("coronal", 1, spacing[2] / spacing[0]), ("axial", 2, spacing[1] / spacing[0])]
    fig = Figure(figsize=(2.6 * (len(order) + 1), 5.6))
    axes = fig.subplots(2, len(order) + 1, squeeze=False)
    for row, (view, axis, aspect) in enumerate(views):
        for col, name in enumerate(order):
            ax = axes[row, col]
            ax.imshow(
                _plane(volumes[name], axis), cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect
            )
            ax.set_title(f"{name} ({view})", fontsize=8)
        err_im = axes[row, -1].imshow(
            _plane(error, axis), cmap="magma", vmin=0, vmax=error_max, origin="lower", aspect=aspect
        )
        axes[row, -1].set_title(f"|prediction − reference| ({view})", fontsize=8)
        fig.colorbar(err_im, ax=axes[row, -1], fraction=0.046)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(
        f"{title}  (grey scale [{lo:g}, {hi:g}]; revgan-med output is derived, not for diagnosis)", fontsize=9
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    return path
