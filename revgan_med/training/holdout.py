"""Automatic hold-out: a run whose datalist has one training case and no validation case validates on
the far end of that case instead of not validating at all.

The case is cut once, along its slice axis, into a training part and the last ``fraction`` of its
slices for validation, so the held-out part is whole cross-sections like any other scan's (a strip at an
in-plane edge is mostly air, couch or head holder: on the shared kernel pairs the model's margin there
was negative where it was positive on the test half, so ``best.pt`` was always the untrained start).
The slice axis is the one with the thickest voxels (z on a tie), if it has at least `MIN_SLICES` input
slices; else the longest axis. For super-resolution the cut falls on a whole thick slice, so the
input and the target of each part cover the same field of view. The parts are written as NIfTI (with
their shifted affines) and a datalist under ``RUN_DIR/holdout/``; the run's config then points at that
datalist, so training never sees the held-out voxels and a resumed run finds the same split.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np

from revgan_med.config import Config
from revgan_med.data.datasets import SR_TASKS, load_datalist
from revgan_med.io import load_volume, save_volume
from revgan_med.io.atomic import atomic_write_text

HOLDOUT_FRACTION = 0.2
MIN_SLICES = 5  # along the slice axis: a fifth of them is at least one slice, and four stay for training
_VOLUME_KEYS = ("image", "target", "mask")  # the datalist keys that hold volumes


def _part(array: np.ndarray, affine: np.ndarray, axis: int, start: int, stop: int) -> tuple:
    """Voxels ``start:stop`` along `axis` and the affine of that part (its voxel 0 moved to `start`)."""
    shift = np.eye(4)
    shift[axis, 3] = start
    return np.take(array, np.arange(start, stop), axis=axis), np.asarray(affine, dtype=np.float64) @ shift


def _holdout_axis(shape: tuple[int, ...], affine: np.ndarray, factors: tuple[int, ...]) -> int:
    """The slice axis of a target grid — the thickest voxels of the input (the target's times the
    super-resolution `factors`), the last of equals — when it has `MIN_SLICES` input slices, else the
    longest axis."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0) * factors
    thickest = max(range(3), key=lambda a: (round(float(spacing[a]), 6), a))
    return thickest if shape[thickest] // factors[thickest] >= MIN_SLICES else int(np.argmax(shape))


def holdout_config(
    config: Config, run_dir: str | Path, *, fraction: float = HOLDOUT_FRACTION, write: bool = True
) -> Config:
    """`config` unchanged, or — one training case, no validation case — with ``data.datalist`` set to
    a split of that case written under ``run_dir/holdout`` (`write=False`: only the path, for the ranks
    that wait for rank 0 to write it)."""
    datalist = Path(config.data.datalist)
    try:
        raw = json.loads(datalist.read_text())
    except (OSError, ValueError):
        return config  # the training data loader reports a missing or unreadable datalist
    if not isinstance(raw, dict) or raw.get("validation") or len(raw.get("training") or []) != 1:
        return config
    folder = Path(run_dir) / "holdout"
    new = dataclasses.replace(
        config, data=dataclasses.replace(config.data, datalist=str(folder / "datalist.json"))
    )
    (case,) = load_datalist(datalist, "training")
    target, target_affine = load_volume(case["target"])
    factors = tuple(config.data.factors) if config.task in SR_TASKS else (1, 1, 1)
    axis = _holdout_axis(target.shape[:3], target_affine, factors)
    factor = factors[axis]
    length = target.shape[axis] // factor  # whole thick slices (the input's voxels along `axis`)
    held = max(1, round(fraction * length))
    if length - held < 1:
        warnings.warn(f"no validation during training: {case['target']} is too thin to hold out a part of it",
                      stacklevel=2)  # fmt: skip
        return config
    cut = length - held
    warnings.warn(
        f"{datalist} has one training case and no validation case: validating on its last {held * factor} of "
        f"{target.shape[axis]} voxels along axis {axis} (held out from training, written to {folder})",
        stacklevel=2,
    )
    if not write:
        return new
    entries: dict[str, dict] = {"training": {}, "validation": {}}
    for key in (k for k in _VOLUME_KEYS if k in case):
        array, affine = load_volume(case[key])
        scale = factor if key == "image" and config.task in SR_TASKS else 1  # input on the thick grid
        # the HR part of an SR case ends at a whole block: trailing voxels stay with the validation part
        parts = {
            "training": (0, cut * factor // scale),
            "validation": (cut * factor // scale, array.shape[axis]),
        }
        for split, (start, stop) in parts.items():
            path = save_volume(*_part(array, affine, axis, start, stop), folder / split / f"{key}.nii.gz",
                               description=f"{split} part of {Path(case[key]).name}")  # fmt: skip
            entries[split][key] = str(path.relative_to(folder))
    listing = {split: [{**{k: v for k, v in case.items() if k not in _VOLUME_KEYS}, **item}]
               for split, item in entries.items()}  # fmt: skip
    atomic_write_text(folder / "datalist.json", json.dumps(listing, indent=2))
    return new
