"""The experiment spec: the facts of a task that every stage after preprocessing must agree on.

A `TaskSpec` holds the task (and so its image channels), the intensity window, the super-resolution
factors, how the thick-slice input is upsampled and the training patch. `preprocess` writes it into
``datalist.json``, `train` checks its config against it and saves it in every checkpoint, and
`infer` / `evaluate --checkpoint` read it from the checkpoint, so a window or factors are typed once.
Every task default of the package is defined here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

TASKS = ("ct-sr", "ct-kernel", "dmri-sr")
# image channels per task: CT is one HU channel, dMRI the 6 free components of the diffusion tensor
TASK_CHANNELS = {"ct-sr": 1, "ct-kernel": 1, "dmri-sr": 6}
SR_TASKS = ("ct-sr", "dmri-sr")
# how a thick-slice scan is mapped onto the HR grid (`revgan_med.data.degradation.upsample_to_hr`)
UPSAMPLE_MODES = ("nearest", "trilinear", "tricubic")
DEFAULT_WINDOW = "chest-1024"  # CT window of the CT tasks unless a config or preprocess names another
DEFAULT_FACTORS = (2, 2, 4)  # super-resolution factors x, y, z (thick slices along z)
# CT windows in HU; ct-full is the 12-bit scanner range, nothing clipped (kernel conversion must see the
# lung texture below -900 HU and bone above 400 HU that a display window would flatten)
WINDOWS = {"chest-1024": (-1150.0, 350.0), "nlst": (-900.0, 400.0), "ct-full": (-1024.0, 3071.0)}
WindowSpec = str | Sequence[float]


def parse_window(value: WindowSpec) -> tuple[float, float]:
    """A preset name (`WINDOWS`), a "MIN,MAX" string or a [min, max] list → (lo, hi) in HU."""
    if isinstance(value, str):
        if value in WINDOWS:
            return WINDOWS[value]
        parts = value.split(",")
    else:
        parts = list(value) if isinstance(value, (list, tuple)) else []
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"window {value!r}: expected one of {', '.join(WINDOWS)}, 'MIN,MAX' or [min, max]"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"window {value!r}: need finite MIN < MAX")
    return lo, hi


def parse_factors(value: str | Sequence[int]) -> tuple[int, int, int]:
    """``"X,Y,Z"`` or three integers ≥ 1 → ``(x, y, z)``; a `ValueError` naming the value otherwise."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        factors = tuple(int(p) for p in parts if not isinstance(p, bool) and float(p) == int(p))
    except (TypeError, ValueError, OverflowError):
        factors = ()
    if len(factors) != 3 or len(parts) != 3 or min(factors) < 1:
        raise ValueError(f"factors {value!r}: need three positive integers X,Y,Z")
    return factors  # type: ignore[return-value]


def default_window(task: str) -> str | None:
    """The window a task's images are shown to the network and compared in (None: dMRI has none)."""
    return None if task == "dmri-sr" else DEFAULT_WINDOW


# how a volume is extended beyond its border for the windows that predict its edge voxels
# (`revgan_med.tiling.pad_volume`), measured with the same weights both ways: a kernel converter's
# sharpening answers the edge that repeating the border voxels makes where anatomy or a holder leaves
# the field of view (head phantom UB → YA, whole test half: 39.50 dB replicate, 43.45 odd-reflect),
# while super-resolution did slightly better with the border repeated (chest slab / abdomen +1.11 /
# +1.18 dB over tricubic against +1.06 / +1.14; DTI interior RMSE 1.930e-4 against 1.939e-4 mm²/s)
BORDER_PADDING = {"ct-kernel": "odd-reflect", "ct-sr": "replicate", "dmri-sr": "replicate"}

# a network may see a wider window than the one it is judged in: kernels train in ct-full (the lung
# texture and bone stay unclipped) but are compared in the NLST window (thesis §5.5)
METRIC_WINDOWS = {"ct-kernel": "nlst"}


def evaluation_window(
    task: str, window: WindowSpec | None = None, model_window: Sequence[float] | None = None
) -> tuple[float, float] | None:
    """The window metrics are computed in: `window` when given, else the task's metric window
    (`METRIC_WINDOWS`), else the model's own window (from its checkpoint), else the task's default;
    None (no clipping) for dMRI without a given window."""
    if window is not None:
        return parse_window(window)
    if task in METRIC_WINDOWS:
        return parse_window(METRIC_WINDOWS[task])
    if model_window is not None:
        return parse_window(model_window)
    default = default_window(task)
    return None if default is None else parse_window(default)


@dataclass(frozen=True)
class TaskSpec:
    """Task, window (CT, HU), factors, upsampling and training patch of one experiment.

    Build with `TaskSpec.create`, which validates and normalises: factors are (1, 1, 1) for
    ct-kernel (no resampling), the window is None for dmri-sr (scaled per channel instead) and for a
    CT task whose window was not chosen (the default window then applies). `patch_size` is None until
    training chose one, and so is `upsample`.
    """

    task: str
    window: tuple[float, float] | None
    factors: tuple[int, int, int]
    upsample: str | None = None
    patch_size: tuple[int, int, int] | None = None

    @classmethod
    def create(
        cls,
        task: str,
        *,
        window: WindowSpec | None = None,
        factors: str | Sequence[int] = DEFAULT_FACTORS,
        upsample: str | None = None,
        patch_size: Sequence[int] | None = None,
    ) -> TaskSpec:
        """A validated spec; `window` None leaves the window open (the task's default applies)."""
        if task not in TASKS:
            raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
        if upsample is not None and upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample {upsample!r}: expected one of {', '.join(UPSAMPLE_MODES)}")
        lo_hi = None if task == "dmri-sr" or window is None else parse_window(window)
        f = parse_factors(factors) if task in SR_TASKS else (1, 1, 1)
        patch = None if patch_size is None else tuple(int(p) for p in patch_size)
        if patch is not None and (len(patch) != 3 or min(patch) < 1):
            raise ValueError(f"patch_size {list(patch_size)!r}: need three positive integers")
        return cls(task, lo_hi, f, upsample, patch)  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, config: Any) -> TaskSpec:
        """The spec a training `Config` describes."""
        data = config.data
        return cls.create(
            config.task, window=data.window, factors=data.factors, upsample=data.upsample,
            patch_size=data.patch_size,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskSpec:
        """Rebuild from `to_dict` output (unknown keys, e.g. ``channels``, are ignored)."""
        if "task" not in values:
            raise ValueError("spec without a task")
        keys = {f.name for f in fields(cls)} - {"task"}
        return cls.create(values["task"], **{k: values[k] for k in keys if values.get(k) is not None})

    @property
    def channels(self) -> int:
        return TASK_CHANNELS[self.task]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON and ``weights_only`` checkpoints)."""
        return {
            "task": self.task,
            "channels": self.channels,
            "window": None if self.window is None else list(self.window),
            "factors": list(self.factors),
            "upsample": self.upsample,
            "patch_size": None if self.patch_size is None else list(self.patch_size),
        }

    def mismatches(self, data: TaskSpec) -> list[str]:
        """``key ours, data theirs`` per differing fact: task, factors, window (where both chose one)."""
        keys = ["task", "factors"] + (["window"] if None not in (self.window, data.window) else [])
        return [
            f"{key} {_show(getattr(self, key))}, data {_show(getattr(data, key))}"
            for key in keys
            if getattr(self, key) != getattr(data, key)
        ]


def _show(value: Any) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def datalist_spec(path: str | Path) -> TaskSpec | None:
    """The spec `preprocess` recorded in a datalist; None for a datalist written by hand or missing."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the datalist ({exc})".splitlines()[0]) from None
    spec = values.get("spec") if isinstance(values, dict) else None
    if spec is None:
        return None
    try:
        return TaskSpec.from_dict(spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid spec ({exc})") from None


def training_spec(config: Any) -> TaskSpec:
    """The spec of a training `Config`, checked against the one its datalist records.

    The config is never silently changed: a task, factors or window that differs from what
    `preprocess` recorded is a one-line `ValueError` naming both values and the datalist.
    """
    spec = TaskSpec.from_config(config)
    data = datalist_spec(config.data.datalist)
    problems = [] if data is None else spec.mismatches(data)
    if problems:
        raise ValueError(
            f"{config.data.datalist}: the config does not match how the data were preprocessed "
            f"(config {'; config '.join(problems)}); set data.window / data.factors / task to the "
            "datalist's values or preprocess again"
        )
    return spec
