"""Automatic hold-out: a run whose datalist has one training case and no validation case validates on
the far end of that case instead of not validating at all.

The case is cut once, along its longest axis (on the target grid), into a training part and the last
``fraction`` of it for validation; for super-resolution the cut falls on a whole thick slice, so the
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
_VOLUME_KEYS = ("image", "target", "mask")  # the datalist keys that hold volumes


def _part(array: np.ndarray, affine: np.ndarray, axis: int, start: int, stop: int) -> tuple:
    """Voxels ``start:stop`` along `axis` and the affine of that part (its voxel 0 moved to `start`)."""
    shift = np.eye(4)
    shift[axis, 3] = start
    return np.take(array, np.arange(start, stop), axis=axis), np.asarray(affine, dtype=np.float64) @ shift


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
    target_shape = load_volume(case["target"])[0].shape[:3]
    axis = int(np.argmax(target_shape))
    factor = config.data.factors[axis] if config.task in SR_TASKS else 1
    length = target_shape[axis] // factor  # whole thick slices (the input's voxels along `axis`)
    held = max(1, round(fraction * length))
    if length - held < 1:
        warnings.warn(f"no validation during training: {case['target']} is too thin to hold out a part of it",
                      stacklevel=2)  # fmt: skip
        return config
    cut = length - held
    warnings.warn(
        f"{datalist} has one training case and no validation case: validating on its last {held * factor} of "
        f"{target_shape[axis]} voxels along axis {axis} (held out from training, written to {folder})",
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
