"""Tiny CT kernel-conversion datasets for the training tests, written to a temp folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from revgan_med.config import Config, config_from_dict
from revgan_med.data.degradation import thick_slice
from revgan_med.io import save_volume

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def write_kernel_datalist(
    folder: Path, *, cases: int = 3, shape: tuple[int, int, int] = (28, 28, 28), validation: bool = True
) -> Path:
    """`cases` smooth/sharp CT pairs on one grid (the last one for validation, unless `validation` is
    False) and their datalist."""
    rng = np.random.default_rng(7)
    entries = []
    for index in range(cases):
        body = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
        sharp = np.where(body > 0, 40.0 + 400.0 * body, -1000.0) + 30.0 * rng.normal(size=shape)
        smooth = ndimage.gaussian_filter(sharp, 1.0)
        case = folder / f"case{index}"
        case.mkdir(parents=True)
        save_volume(smooth.astype(np.float32), AFFINE, case / "smooth.nii.gz")
        save_volume(sharp.astype(np.float32), AFFINE, case / "sharp.nii.gz")
        entries.append({"image": f"case{index}/smooth.nii.gz", "target": f"case{index}/sharp.nii.gz"})
    datalist = folder / "datalist.json"
    split = len(entries) - 1 if validation else len(entries)
    datalist.write_text(json.dumps({"training": entries[:split], "validation": entries[split:]}))
    return datalist


def write_sr_datalist(folder: Path, *, shape: tuple[int, int, int] = (24, 24, 40)) -> Path:
    """One CT super-resolution case (HR target and its ×(2, 2, 4) thick-slice input), no validation case."""
    rng = np.random.default_rng(3)
    hr = np.where(ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > 0, 40.0, -1000.0)
    hr = ndimage.gaussian_filter(hr, 1.0) + 20.0 * rng.normal(size=shape)
    lr, lr_affine = thick_slice(hr, AFFINE, (2, 2, 4))
    save_volume(hr.astype(np.float32), AFFINE, folder / "case" / "hr.nii.gz")
    save_volume(lr.astype(np.float32), lr_affine, folder / "case" / "lr.nii.gz")
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "case/lr.nii.gz", "target": "case/hr.nii.gz"}]}))
    return datalist


def tiny_config(datalist: Path, *overrides: str) -> Config:
    """A CPU config that trains in about a second: 24³ patches, width 4, 6 steps."""
    values = {
        "task": "ct-kernel",
        "data": {"datalist": str(datalist), "window": "nlst", "patch_size": [24, 24, 24],
                 "samples_per_volume": 2, "num_workers": 0},
        "model": {"generator": "rev_resnet3d", "width": 4, "depth": 2, "disc_width": 4},
        "train": {"steps": 6, "decay_start": 3, "val_every": 3, "checkpoint_every": 3, "log_every": 1,
                  "device": "cpu"},
        "infer": {"target_size": 16},
    }  # fmt: skip
    return config_from_dict(values, overrides)
