"""Validation during training: whole volumes through sliding-window inference, metrics in scanner units.

The validation cases of the datalist are loaded once (input on the target grid, normalised). Each
validation predicts every volume with `revgan_med.tiling.sliding_window_predict` — the same
windows `revgan-med infer` uses — maps prediction and target back to HU (or the dMRI scanner units)
and reports the mean MAE / PSNR / SSIM over the cases (`revgan_med.evaluation.compute_metrics`):
for CT inside the task's window, with the window width as data range (thesis ``000_*`` §5.4–5.5);
for dMRI inside the brain mask, with the target's range there.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from revgan_med.config import Config
from revgan_med.data.datasets import load_case, load_datalist
from revgan_med.data.transforms import CTWindow
from revgan_med.evaluation import compute_metrics
from revgan_med.tiling import DEFAULT_MARGIN, sliding_window_predict, window_sizes
from revgan_med.training.logging import RunLogger


def _coronal(volume: np.ndarray) -> np.ndarray:
    """Middle coronal slice of channel 0 of a (C, X, Y, Z) volume, superior up."""
    return volume[0, :, volume.shape[2] // 2, :].T[::-1]


class ValidationSet:
    """Whole validation volumes and how to predict them.

    Args:
        cases: `revgan_med.data.datasets.load_case` results (``image``/``target`` as (C, X, Y, Z)).
        patch_size: the training patch.
        context_size, target_size: the windows (`revgan_med.tiling.window_sizes`, as ``infer``: None
            and None = as large as the budget allows, with the generator's receptive radius as margin).
    """

    def __init__(
        self,
        cases: list[dict[str, Any]],
        *,
        patch_size: Sequence[int],
        context_size: int | Sequence[int] | None = None,
        target_size: int | Sequence[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        if not cases:
            raise ValueError("ValidationSet: no cases")
        self.cases = cases
        self.patch_size, self.context_size, self.target_size = patch_size, context_size, target_size
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, config: Config, intensity: Any) -> ValidationSet | None:
        """The datalist's validation cases, or None (with a warning) when it has none."""
        data = config.data
        try:
            items = load_datalist(data.datalist, "validation")
        except ValueError as exc:
            warnings.warn(f"no validation during training: {exc}", stacklevel=2)
            return None
        if not items:
            warnings.warn(
                f"no validation during training: {data.datalist} has no validation cases", stacklevel=2
            )
            return None
        cases = [
            load_case(
                item,
                task=config.task,
                intensity_or_window=intensity,
                factors=data.factors,
                upsample=data.upsample,
            )  # fmt: skip
            for item in items
        ]
        return cls(cases, patch_size=data.patch_size, context_size=config.infer.context_size,
                   target_size=config.infer.target_size, batch_size=config.infer.batch_size)  # fmt: skip

    def predict(self, generator: nn.Module, image: np.ndarray, *, device: torch.device) -> np.ndarray:
        """X→Y prediction of one normalised (C, X, Y, Z) volume, same shape."""
        volume = torch.from_numpy(image)[None]
        radius = getattr(generator, "receptive_radius", None)
        target, context = window_sizes(
            image.shape[1:], patch_size=self.patch_size, margin=radius() if radius else DEFAULT_MARGIN,
            target_size=self.target_size, context_size=self.context_size,
        )  # fmt: skip
        out = sliding_window_predict(
            generator, volume, target_size=target, context_size=context, batch_size=self.batch_size,
            device=device,
        )  # fmt: skip
        return out[0].numpy()

    def evaluate(
        self, generator: nn.Module, *, device: torch.device, logger: RunLogger | None = None, step: int = 0
    ) -> dict[str, float]:
        """Mean ``mae``, ``rmse``, ``psnr``, ``ssim`` over the cases; logs input | output | target."""
        was_training = generator.training
        generator.eval()
        rows = []
        for index, case in enumerate(self.cases):
            prediction = self.predict(generator, case["image"], device=device)
            mapping = case["mapping"]
            if isinstance(mapping, CTWindow):  # denormalize clips to the window: metrics in the window
                pred, ref = mapping.denormalize(prediction)[0], mapping.denormalize(case["target"])[0]
                rows.append(compute_metrics(pred, ref, data_range=mapping.hi - mapping.lo))
            else:
                pred = mapping.denormalize(prediction, channel_axis=0)
                ref = mapping.denormalize(case["target"], channel_axis=0)
                inside = ref[:, case["mask"]]
                data_range = float(inside.max() - inside.min()) or 1.0
                rows.append(
                    compute_metrics(pred, ref, data_range=data_range, mask=case["mask"], channel_axis=0)
                )
            if index == 0 and logger is not None:
                panels = [_coronal(v) for v in (case["image"], prediction, case["target"])]
                logger.images(step, "validation/input_output_target", panels)
        generator.train(was_training)
        return {k: float(np.mean([row[k] for row in rows])) for k in ("mae", "rmse", "psnr", "ssim")}
