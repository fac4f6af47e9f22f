"""Validation during training: whole volumes through sliding-window inference, metrics in scanner units,
beside the classical baseline the model has to beat.

The validation cases of the datalist are loaded once (input on the target grid, normalised); under
``torchrun`` every rank loads and predicts its share (cases rank, rank + world size, …) and the
per-case metrics are gathered, so each rank computes the same means. Each
validation predicts every volume with `revgan_med.tiling.predict_volume` — the same windows
`revgan-med infer` uses — maps prediction and target back to HU (or the dMRI scanner units)
and reports the mean MAE / PSNR / SSIM over the cases (`revgan_med.evaluation.compute_metrics`):
for CT inside the task's metric window (`revgan_med.tasks.METRIC_WINDOWS`, else the training window),
with the window width as data range (thesis ``000_*`` §5.4–5.5), inside the body when training
there (``loss.region: body``); for dMRI inside the brain mask, with the target's range there.

The baseline is what one would do without the model: tricubic upsampling for super-resolution, the
generator's linear start (the least-squares fitted filter, or the classical filter that
``train.linear_start: strongest`` chose; scored once, before training) or else the input unchanged for
kernel conversion. Its scores are reported as ``baseline_*`` and the model's
PSNR margin over it as ``psnr_margin``, which is what ``best.pt`` is chosen on. A kernel model serves
both directions (``infer --direction inverse``), so it is validated both ways: the sharp → smooth
scores as ``inverse_*`` and ``inverse_baseline_*``, and ``psnr_margin`` is the mean of the two
directions' margins (a checkpoint that only gains in one direction and loses as much in the other is
no better than its start). A generator that can fall back to its fitted linear filter per direction
(``baseline_only``: a gated residual correction) counts a direction below its baseline as 0 and
reports it as ``fallback`` / ``inverse_fallback`` = 1: the `best.pt` saved from that validation has
that direction's correction switched off, so there it IS its baseline.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from revgan_med.config import Config
from revgan_med.data.datasets import load_case, load_datalist
from revgan_med.data.transforms import CTWindow
from revgan_med.evaluation import compute_metrics
from revgan_med.tasks import BORDER_PADDING, METRIC_WINDOWS, parse_window
from revgan_med.tiling import DEFAULT_MARGIN, predict_volume, with_border
from revgan_med.training.distributed import DistributedContext, gather_lists
from revgan_med.training.logging import RunLogger

METRICS = ("mae", "rmse", "psnr", "ssim")
KERNEL_DIRECTIONS = ("forward", "inverse")  # a kernel model converts both ways (``infer --direction``)


def _metric_window(task: str) -> tuple[float, float] | None:
    return parse_window(METRIC_WINDOWS[task]) if task in METRIC_WINDOWS else None


def _prefix(direction: str) -> str:
    """The metric-name prefix of a direction: none for X → Y, ``inverse_`` for Y → X."""
    return "" if direction == "forward" else "inverse_"


def baseline_name(config: Config) -> str:
    """The classical baseline validation scores for `config`'s task (kernels: the linear start)."""
    if config.task != "ct-kernel":
        return "tricubic"
    if not config.model.linear_kernel:
        return "identity (the input)"
    return "fitted linear filter" if config.train.linear_start == "least-squares" else "linear start"


def _coronal(volume: np.ndarray) -> np.ndarray:
    """Middle coronal slice of channel 0 of a (C, X, Y, Z) volume, superior up."""
    return volume[0, :, volume.shape[2] // 2, :].T[::-1]


class ValidationSet:
    """Whole validation volumes and how to predict them.

    Args:
        cases: `revgan_med.data.datasets.load_case` results (``image``/``target`` as (C, X, Y, Z)),
            with ``baseline`` (the baseline's normalised prediction, same shape) where it does not
            come from the generator.
        patch_size: the training patch.
        context_size, target_size: the windows (`revgan_med.tiling.window_sizes`, as ``infer``: None
            and None = as large as the budget allows, with the generator's receptive radius as margin).
        baseline: the baseline's name (`baseline_name`); without a case ``baseline`` it is the
            generator's linear path (plus the input for residual generators), or the input itself.
        metric_window: HU window of the CT metrics (None: the training window).
        directions: ``("forward",)``, or ``("forward", "inverse")`` to validate Y → X as well.
        context: under ``torchrun``, `cases` are this rank's share (maybe none) and the metrics are
            gathered from every rank's.
    """

    def __init__(
        self,
        cases: list[dict[str, Any]],
        *,
        patch_size: Sequence[int],
        context_size: int | Sequence[int] | None = None,
        target_size: int | Sequence[int] | None = None,
        batch_size: int = 1,
        baseline: str = "identity (the input)",
        metric_window: Sequence[float] | None = None,
        directions: Sequence[str] = ("forward",),
        context: DistributedContext | None = None,
        padding_mode: str = "replicate",
    ) -> None:
        self.context = context or DistributedContext(0, 1, 0, torch.device("cpu"))
        if not cases and not self.context.enabled:
            raise ValueError("ValidationSet: no cases")
        if not directions or set(directions) - {"forward", "inverse"}:
            raise ValueError(f"ValidationSet: directions {list(directions)}: expected forward and/or inverse")
        self.cases = cases
        self.patch_size, self.context_size, self.target_size = patch_size, context_size, target_size
        self.batch_size = batch_size
        self.baseline = baseline
        self.metric_window = metric_window
        self.padding_mode = padding_mode  # beyond the volume's border, as `infer` (`BORDER_PADDING`)
        self.directions = tuple(directions)
        self.baseline_scores: dict[str, float] | None = None

    @classmethod
    def from_config(
        cls, config: Config, intensity: Any, context: DistributedContext | None = None
    ) -> ValidationSet | None:
        """The datalist's validation cases (this rank's share under `context`), or None (with a warning
        from rank 0) when it has none."""
        data = config.data
        quiet = context is not None and not context.is_main
        try:
            items = load_datalist(data.datalist, "validation")
        except ValueError as exc:
            items, problem = [], str(exc)
        else:
            problem = f"{data.datalist} has no validation cases"
        if not items:
            if not quiet:
                warnings.warn(f"no validation during training: {problem}", stacklevel=2)
            return None
        if context is not None:
            items = items[context.rank :: context.world_size]

        def load(item: dict, upsample: str, body: bool = False) -> dict[str, Any]:
            return load_case(item, task=config.task, intensity_or_window=intensity, factors=data.factors,
                             upsample=upsample, body=body)  # fmt: skip

        cases = [load(item, data.upsample, config.loss.region == "body") for item in items]
        baseline = baseline_name(config)
        if baseline == "tricubic":
            for case, item in zip(cases, items, strict=True):
                case["baseline"] = (
                    case["image"] if data.upsample == "tricubic" else load(item, "tricubic")["image"]
                )
        return cls(cases, patch_size=data.patch_size, context_size=config.infer.context_size,
                   target_size=config.infer.target_size, batch_size=config.infer.batch_size,
                   baseline=baseline, metric_window=_metric_window(config.task),
                   directions=KERNEL_DIRECTIONS if config.task == "ct-kernel" else ("forward",),
                   context=context, padding_mode=BORDER_PADDING[config.task])  # fmt: skip

    def predict(
        self, generator: nn.Module, image: np.ndarray, *, device: torch.device, direction: str = "forward"
    ) -> np.ndarray:
        """X→Y (or, `direction` ``inverse``, Y→X) prediction of one normalised (C, X, Y, Z) volume."""
        volume = torch.from_numpy(image)[None]
        radius = getattr(generator, "receptive_radius", None)
        out, _ = predict_volume(
            generator if direction == "forward" else generator.inverse, volume, patch_size=self.patch_size,
            margin=radius() if radius else DEFAULT_MARGIN, target_size=self.target_size,
            context_size=self.context_size, batch_size=self.batch_size, device=device,
            padding_mode=self.padding_mode,
        )  # fmt: skip
        return out[0].numpy()

    @staticmethod
    def _source_reference(case: dict[str, Any], direction: str) -> tuple[np.ndarray, np.ndarray]:
        return (case["image"], case["target"]) if direction == "forward" else (case["target"], case["image"])

    def _metrics(
        self, case: dict[str, Any], prediction: np.ndarray, direction: str = "forward"
    ) -> dict[str, float]:
        """Metrics of one normalised prediction against the case's target (`direction` ``inverse``: its
        input), in scanner units."""
        reference = self._source_reference(case, direction)[1]
        mapping = case["mapping"]
        if isinstance(mapping, CTWindow):  # denormalize clips to the training window
            lo, hi = self.metric_window or (mapping.lo, mapping.hi)
            pred, ref = (np.clip(mapping.denormalize(v)[0], lo, hi) for v in (prediction, reference))
            return compute_metrics(pred, ref, data_range=hi - lo, mask=case.get("body"))
        pred = mapping.denormalize(prediction, channel_axis=0)
        ref = mapping.denormalize(reference, channel_axis=0)
        inside = ref[:, case["mask"]]
        data_range = float(inside.max() - inside.min()) or 1.0
        return compute_metrics(pred, ref, data_range=data_range, mask=case["mask"], channel_axis=0)

    @torch.no_grad()
    def score_baseline(self, generator: nn.Module) -> dict[str, float]:
        """Mean metrics of the baseline over the cases (``baseline_*``, ``inverse_baseline_*``), computed
        on the first call and kept; for kernels from the linear paths' solved filters (the fitted start,
        also after a resume)."""
        if self.baseline_scores is None:
            self.baseline_scores = {}
            for direction in self.directions:
                rows = [self._metrics(case, self._baseline(case, generator, direction), direction)
                        for case in self.cases]  # fmt: skip
                rows = gather_lists(rows, self.context)
                self.baseline_scores.update(
                    {f"{_prefix(direction)}baseline_{k}": v for k, v in _mean(rows).items()}
                )
        return self.baseline_scores

    def _baseline(self, case: dict[str, Any], generator: nn.Module, direction: str) -> np.ndarray:
        """The baseline's normalised prediction of one case in `direction` (a linear path: the whole
        volume at once, extended beyond its border as the model's windows are)."""
        if direction == "forward" and "baseline" in case:
            return case["baseline"]
        source = self._source_reference(case, direction)[0]
        path = getattr(generator, "lin_y" if direction == "forward" else "lin_x", None)
        if path is None:
            return source
        volume = torch.from_numpy(source)[None].to(path.weight.device)
        filtered = with_border(path.solved, volume, path.padding, mode=self.padding_mode)  # radius = padding
        out = filtered + volume if generator.residual else filtered
        return out[0].cpu().numpy()

    def evaluate(
        self, generator: nn.Module, *, device: torch.device, logger: RunLogger | None = None, step: int = 0
    ) -> dict[str, float]:
        """Mean ``mae``, ``rmse``, ``psnr``, ``ssim`` over the cases per direction (``inverse_*`` for Y → X),
        the baseline's as ``baseline_*`` / ``inverse_baseline_*``, for a generator with ``baseline_only``
        whether the direction falls back to its baseline (``fallback``, 1 when below it) and
        ``psnr_margin``, the mean over the directions of model − baseline PSNR (dB; 0 where it falls
        back); logs input | output | target of X → Y."""
        switchable = getattr(generator, "baseline_only", None) is not None
        was_training = generator.training
        generator.eval()
        baseline, scores, margins = self.score_baseline(generator), {}, []
        for direction in self.directions:
            rows = []
            for index, case in enumerate(self.cases):
                source = self._source_reference(case, direction)[0]
                prediction = self.predict(generator, source, device=device, direction=direction)
                rows.append(self._metrics(case, prediction, direction))
                if index == 0 and direction == "forward" and logger is not None:
                    panels = [_coronal(v) for v in (case["image"], prediction, case["target"])]
                    logger.images(step, "validation/input_output_target", panels)
            prefix = _prefix(direction)
            scores.update({f"{prefix}{k}": v for k, v in _mean(gather_lists(rows, self.context)).items()})
            margin = scores[f"{prefix}psnr"] - baseline[f"{prefix}baseline_psnr"]
            if switchable:
                scores[f"{prefix}fallback"] = float(margin < 0)
            margins.append(max(margin, 0.0) if switchable else margin)
        generator.train(was_training)
        return {**scores, **baseline, "psnr_margin": float(np.mean(margins))}


def fallbacks(metrics: dict[str, float]) -> torch.Tensor:
    """(forward, inverse) bool: the directions that `ValidationSet.evaluate` let fall back to their
    baseline (the value of a generator's ``baseline_only`` in the checkpoint saved from `metrics`)."""
    return torch.tensor([metrics.get(f"{_prefix(d)}fallback", 0.0) > 0 for d in KERNEL_DIRECTIONS])


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([row[k] for row in rows])) for k in METRICS}


def margin_report(run_dir: str | Path, baseline: str) -> list[str]:
    """The lines that end a run, from its ``metrics.csv``: model vs baseline at the last validation (per
    direction for a kernel model, with what best.pt keeps of each), and a WARNING for each direction in
    which the model ends below its baseline there (none without validation)."""
    path = Path(run_dir) / "metrics.csv"
    rows = [r for r in csv.DictReader(path.open()) if r.get("val_psnr")] if path.is_file() else []
    if not rows or not rows[-1].get("val_psnr_margin"):
        return []
    last, best = rows[-1], max(rows, key=lambda r: float(r["val_psnr_margin"]))
    directions = {"": "X → Y", "inverse_": "Y → X"} if last.get("val_inverse_psnr") else {"": ""}

    def margin(row: dict[str, str], prefix: str) -> float:
        return float(row[f"val_{prefix}psnr"]) - float(row[f"val_{prefix}baseline_psnr"])

    def scores(prefix: str) -> str:
        model, base = (f"val_{prefix}", f"val_{prefix}baseline_")
        return (f"model PSNR {float(last[model + 'psnr']):.2f} dB, SSIM {float(last[model + 'ssim']):.4f}; "
                f"baseline ({baseline}) {float(last[base + 'psnr']):.2f} dB, "
                f"SSIM {float(last[base + 'ssim']):.4f}; margin {margin(last, prefix):+.2f} dB")  # fmt: skip

    chosen = f"best.pt: step {best['step']}, "
    if len(directions) == 1:
        chosen += f"margin {float(best['val_psnr_margin']):+.2f} dB"
        lines = [f"validation at step {last['step']}: {scores('')} ({chosen})"]
    else:
        each = ", ".join(
            f"{name} {margin(best, prefix):+.2f}" if not float(best.get(f"val_{prefix}fallback") or 0)
            else f"{name} its baseline (the model: {margin(best, prefix):+.2f})"
            for prefix, name in directions.items()
        )  # fmt: skip
        chosen += f"mean margin {float(best['val_psnr_margin']):+.2f} dB ({each})"
        lines = [f"validation at step {last['step']}, {name}: {scores(prefix)}"
                 for prefix, name in directions.items()]  # fmt: skip
        lines.append(f"mean margin {float(last['val_psnr_margin']):+.2f} dB; {chosen}")
    for prefix, name in directions.items():
        if (below := -margin(last, prefix)) > 0:
            lines.append(f"WARNING: the model ends {below:.2f} dB BELOW its baseline ({baseline}) on the "
                         f"validation data{f' ({name})' if name else ''}")  # fmt: skip
    return lines
