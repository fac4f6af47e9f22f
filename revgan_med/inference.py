"""Inference: sliding-window reconstruction of whole volumes (thesis ``000_*`` §5.4–5.5).

Each target window (default 64³) is predicted from a context window centred on it (default the
training patch size, so InstanceNorm statistics match training); only the centres are kept, so
every voxel is predicted exactly once and there are no seams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices

from revgan_med.config import TASK_CHANNELS

Predictor = Callable[[torch.Tensor], torch.Tensor]


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    return values  # type: ignore[return-value]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None → CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def window_grid(
    spatial_shape: Sequence[int], *, target_size: Sequence[int], context_size: Sequence[int]
) -> tuple[list[tuple[int, int]], list[tuple[slice, ...]]]:
    """Padding and context-window slices that tile `spatial_shape` with centred target windows.

    Returns ``(pad, windows)``: ``pad[d] = (before, after)`` for each spatial axis, and one tuple of
    context slices per window into the padded volume. Window ``k`` along an axis starts at
    ``k * target`` in padded coordinates, so its centre ``[k*t + before, (k+1)*t + before)`` is the
    ``k``-th target tile of the original volume.
    """
    pad, padded = [], []
    for size, t, c in zip(spatial_shape, target_size, context_size, strict=True):
        before = (c - t) // 2
        tiles = -(-size // t)  # ceil: the last tile may stick out; its excess is cropped away
        after = tiles * t + (c - t) - before - size
        pad.append((before, after))
        padded.append(size + before + after)
    return pad, dense_patch_slices(padded, list(context_size), list(target_size))


def sliding_window_predict(
    fn: Predictor,
    volume: torch.Tensor,
    *,
    target_size: int | Sequence[int] = 64,
    context_size: int | Sequence[int] = 128,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    amp: bool = False,
    padding_mode: str = "replicate",
    channels_last: bool = False,
) -> torch.Tensor:
    """Apply `fn` to `volume` (B, C, X, Y, Z) window by window; returns (B, C', X, Y, Z) float32.

    `fn` maps a batch of context windows (N, C, *context) to (N, C', *context). Each target window
    is cut from the centre of its context window's prediction, so every voxel is predicted once,
    from a context centred on it. Borders are padded with `padding_mode` — ``replicate`` by default
    because it works for any size (``reflect`` needs the padding to be smaller than the axis, which
    fails for a 20-slice volume under a 128³ context) and extends the scan's edge (air, table) as
    the scanner would rather than mirroring anatomy. `device` runs `fn` (None: the volume's device);
    the result stays on the volume's device, so only one batch of windows lives on the accelerator.

    Ours rather than MONAI's `sliding_window_inference`: MONAI blends every overlapping window with
    its importance map, so "64 in 128" through a near-zero `roi_weight_map` is only approximately the
    centre prediction and accumulates 8× the voxels into a full-size buffer plus a count map; here
    each window writes its centre once. The window grid is MONAI's `dense_patch_slices`.
    """
    if volume.ndim != 5:
        raise ValueError(f"volume must be (B, C, X, Y, Z), got shape {tuple(volume.shape)}")
    target, context = _triple(target_size, "target_size"), _triple(context_size, "context_size")
    if any(t > c for t, c in zip(target, context, strict=True)):
        raise ValueError(f"target_size {target} must not exceed context_size {context}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    run_device = resolve_device(device) if device is not None else volume.device
    spatial = tuple(volume.shape[2:])
    pad, windows = window_grid(spatial, target_size=target, context_size=context)
    flat_pad = [p for before_after in reversed(pad) for p in before_after]  # F.pad wants last axis first
    padded = F.pad(volume.float(), flat_pad, mode=padding_mode)
    jobs = [(b, w) for b in range(volume.shape[0]) for w in windows]
    centre = tuple(slice(before, before + t) for (before, _), t in zip(pad, target, strict=True))
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    out: torch.Tensor | None = None
    with torch.inference_mode(), _autocast(run_device, amp):
        for first in range(0, len(jobs), batch_size):
            chunk = jobs[first : first + batch_size]
            batch = torch.stack([padded[(b, slice(None), *w)] for b, w in chunk])
            pred = fn(batch.to(run_device).contiguous(memory_format=memory_format))
            if tuple(pred.shape[2:]) != context or pred.shape[0] != len(chunk):
                raise ValueError(
                    f"predictor returned shape {tuple(pred.shape)} for windows {tuple(batch.shape)}; "
                    "it must keep the batch and spatial size"
                )
            if out is None:
                out = volume.new_empty((volume.shape[0], pred.shape[1], *spatial), dtype=torch.float32)
            centres = pred[(slice(None), slice(None), *centre)].float().to(out.device)
            for (b, w), tile in zip(chunk, centres, strict=True):
                # padded window start k*t is the original tile start; the last tile is cropped to the volume
                size = [min(t, n - s.start) for s, t, n in zip(w, target, spatial, strict=True)]
                dst = tuple(slice(s.start, s.start + m) for s, m in zip(w, size, strict=True))
                out[(b, slice(None), *dst)] = tile[(slice(None), *(slice(0, m) for m in size))]
    assert out is not None  # at least one window always exists
    return out


@dataclass
class Model:
    """A generator plus everything inference needs from its checkpoint.

    `generator` has ``forward`` (X→Y) and ``inverse`` (Y→X) on (B, C, X, Y, Z) in network units;
    `intensity` is the mapping's ``to_dict()``; `patch_size` the training patch (default context).
    """

    generator: torch.nn.Module
    task: str
    intensity: dict[str, Any]
    patch_size: tuple[int, int, int]
    factors: tuple[int, int, int] = (1, 1, 1)
    upsample: str = "nearest"
    target_size: int = 64
    batch_size: int = 1
    name: str = "model"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def load_model(checkpoint: str | Path, *, device: str | torch.device | None = "auto") -> Model:
    """Read a checkpoint (``weights_only``) and rebuild its generator on `device` in eval mode."""
    from revgan_med.training.checkpoint import generator_from_checkpoint, load_checkpoint

    run_device = resolve_device(device)
    payload = load_checkpoint(checkpoint)
    generator, config = generator_from_checkpoint(payload, run_device)
    return Model(
        generator=generator,
        task=config.task,
        intensity=dict(payload["intensity"]),
        patch_size=_triple(config.data.patch_size, "data.patch_size"),
        factors=_triple(config.data.factors, "data.factors") if config.task != "ct-kernel" else (1, 1, 1),
        upsample=config.data.upsample,
        target_size=config.infer.target_size,
        batch_size=config.infer.batch_size,
        name=f"{config.model.generator} {config.task}",
        device=run_device,
    )


@dataclass
class InferenceResult:
    """Output volume in scanner units (HU for CT) with its affine, and the optional consistency map.

    `consistency` is |G(F(x)) − x| per voxel in scanner units on the grid the model runs on
    (`consistency_affine`; the HR grid for super-resolution), None unless asked for. Within the
    model's receptive field of the volume border it is not zero even for an exact inverse: G sees
    padding of F(x) there, not F of the padded x.
    """

    array: np.ndarray
    affine: np.ndarray
    consistency: np.ndarray | None = None
    consistency_affine: np.ndarray | None = None


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """(x, y, z[, c]) → (1, C, X, Y, Z)."""
    chans = array[..., None] if array.ndim == 3 else array
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(chans, -1, 0)))[None].float()


def _to_array(tensor: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """(1, C, X, Y, Z) → the layout of `like` ((x, y, z) or (x, y, z, c))."""
    array = np.moveaxis(tensor[0].cpu().numpy(), 0, -1)
    return array[..., 0] if like.ndim == 3 else array


def infer_volume(
    model: Model,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    direction: str = "forward",
    target_size: int | Sequence[int] | None = None,
    context_size: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    amp: bool = False,
    keep_out_of_window: bool = True,
    consistency: bool = False,
    channels_last: bool = False,
) -> InferenceResult:
    """Translate one volume (x, y, z[, c]) in scanner units; returns the output in scanner units.

    Forward (X→Y) in super-resolution: `array` is the acquired thick-slice scan; it is upsampled to
    the HR grid exactly inverse to ``thick_slice`` (`upsample_to_hr` with the training mode) and the
    model runs there, so the output lies on the HR grid. Inverse (Y→X) in super-resolution: the
    model's inverse runs on the HR input and the result is block-averaged by ``thick_slice`` onto the
    LR grid — the same degradation the training pairs were made with. CT voxels whose input lies
    outside the training window (bone, metal, air below it) keep the input value when
    `keep_out_of_window` (the model only saw clipped values there). Context defaults to the training
    patch, target to the checkpoint's `infer.target_size` capped at half the context, batch size to
    the checkpoint's `infer.batch_size`.
    """
    from revgan_med.data.degradation import input_support, thick_slice, upsample_to_hr
    from revgan_med.data.transforms import CTWindow, DTIScale, intensity_from_dict

    if direction not in ("forward", "inverse"):
        raise ValueError(f"direction {direction!r}: expected forward or inverse")
    channels = TASK_CHANNELS[model.task]
    grid, grid_affine = np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64)
    if grid.shape[3:] != (() if channels == 1 else (channels,)):
        raise ValueError(
            f"{model.task} expects (x, y, z{'' if channels == 1 else f', {channels}'}), got {grid.shape}"
        )
    super_res = any(f > 1 for f in model.factors)
    up = model.factors if super_res and direction == "forward" else (1, 1, 1)
    brain = input_support(grid, grid_affine, up) if channels > 1 else None  # where the DTI scale is fitted
    if super_res and direction == "forward":
        grid, grid_affine = upsample_to_hr(grid, grid_affine, model.factors, mode=model.upsample)
    mapping = intensity_from_dict(model.intensity)
    if isinstance(mapping, DTIScale) and mapping.scales is None:
        mapping = mapping.fit(grid, brain)  # dMRI scales come from the input itself, as in training
    context = _triple(context_size if context_size is not None else model.patch_size, "context_size")
    if target_size is None:
        target_size = min(model.target_size, *(max(1, c // 2) for c in context))
    batch_size = model.batch_size if batch_size is None else batch_size
    sw: dict[str, Any] = {"target_size": target_size, "context_size": context, "batch_size": batch_size}
    sw.update(device=model.device, amp=amp, channels_last=channels_last)
    step, back = model.generator, model.generator.inverse
    if direction == "inverse":
        step, back = back, step
    x = _to_tensor(mapping.normalize(grid))
    y = sliding_window_predict(step, x, **sw)
    out = mapping.denormalize(_to_array(y, grid))
    if keep_out_of_window and isinstance(mapping, CTWindow):
        outside = (grid < mapping.lo) | (grid > mapping.hi)
        out[outside] = grid[outside]
    result = InferenceResult(out, grid_affine)
    if consistency:
        cycled = mapping.denormalize(_to_array(sliding_window_predict(back, y, **sw), grid))
        result.consistency = np.abs(cycled - mapping.denormalize(_to_array(x, grid)))
        result.consistency_affine = grid_affine
    if super_res and direction == "inverse":
        result.array, result.affine = thick_slice(out, grid_affine, model.factors)
    return result


def consistency_summary(diff: np.ndarray, *, threshold: float = 50.0) -> dict[str, float]:
    """Mean, 95th percentile, max of a consistency map and the fraction of voxels above `threshold`."""
    return {
        "mean": float(diff.mean()),
        "p95": float(np.percentile(diff, 95)),
        "max": float(diff.max()),
        f"frac_gt_{threshold:g}": float((diff > threshold).mean()),
    }


def derived_description(model: Model, direction: str) -> str:
    """The label every output carries: GAN outputs can invent or remove structures (§7.4)."""
    return f"revgan-med derived: {model.name} {direction}; not for diagnosis"


def _refuse_overwrite(input_path: Path, output_path: Path) -> None:
    src, dst = input_path.resolve(), output_path.resolve()
    if dst == src or (src.is_dir() and dst.is_relative_to(src)):
        raise ValueError(f"{output_path}: refusing to write over or inside the input {input_path}")


def infer_path(
    model: Model,
    input_path: str | Path,
    output_path: str | Path,
    *,
    series_uid: str | None = None,
    output_format: str = "nifti",
    consistency_map: str | Path | None = None,
    tilt: str = "correct",
    **options: Any,
) -> dict[str, float] | None:
    """Read a NIfTI file or DICOM series, `infer_volume(**options)`, write the result atomically.

    For dmri-sr models the input may be a 6-channel DTI NIfTI or a DWI series (`load_dti`).

    `output_format` ``nifti`` writes `output_path` (``.nii``/``.nii.gz``) with a "derived" ``descrip``;
    ``dicom`` writes a new derived series into the new folder `output_path` (an existing one is
    refused), referencing the source series when the input is DICOM; a gantry tilt corrected on
    loading (`tilt`, see `load_volume`) is said in both. `consistency_map` (NIfTI)
    receives |G(F(x)) − x|; its summary (`consistency_summary`) is returned. Never writes over or
    inside the input.
    """
    from revgan_med.io import load_volume, save_volume
    from revgan_med.io.volumes import is_nifti

    input_path, output_path = Path(input_path), Path(output_path)
    if output_format not in ("nifti", "dicom"):
        raise ValueError(f"output format {output_format!r}: expected nifti or dicom")
    if output_format == "nifti" and not is_nifti(output_path):
        raise ValueError(f"{output_path}: NIfTI output needs a .nii or .nii.gz name")
    for path in (output_path, consistency_map):
        if path is not None:
            _refuse_overwrite(input_path, Path(path))
    notes: list[str] = []
    if model.task == "dmri-sr":  # a DWI (NIfTI + .bval/.bvec, or DICOM) is fitted to tensors first
        from revgan_med.data.transforms import load_dti

        array, _, affine, _ = load_dti(input_path, series_uid)
    else:
        array, affine = load_volume(input_path, series_uid=series_uid, tilt=tilt, notes=notes)
    direction = options.get("direction", "forward")
    result = infer_volume(model, array, affine, consistency=consistency_map is not None, **options)
    description = derived_description(model, direction) + ("; tilt corrected" if notes else "")
    if output_format == "dicom":
        from revgan_med.io import save_dicom_series

        if result.array.ndim != 3:
            raise ValueError(
                f"{input_path}: DICOM output needs a scalar volume, got shape {result.array.shape}"
            )
        save_dicom_series(
            result.array,
            result.affine,
            output_path,
            series_description=f"revgan-med derived {model.name} {direction}"
            + (" tilt-corrected" if notes else ""),
            source=None if is_nifti(input_path) else input_path,
            source_series_uid=series_uid,
        )
    else:
        save_volume(result.array, result.affine, output_path, description=description)
    if result.consistency is None:
        return None
    label = f"revgan-med consistency |G(F(x))-x|: {model.name} {direction}"
    save_volume(result.consistency, result.consistency_affine, Path(consistency_map), description=label)
    return consistency_summary(result.consistency)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 ≤ i < n) → (i, n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return i, n


def shard_items(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """The `index`-th of `count` contiguous, near-equal slices of `items` (sorted by the caller)."""
    return list(items[len(items) * index // count : len(items) * (index + 1) // count])


@dataclass
class BatchReport:
    """A folder run: (input, output, consistency summary) per success, (input, message) per failure."""

    done: list[tuple[Path, Path, dict[str, float] | None]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def infer_inputs(
    model: Model,
    input_path: str | Path,
    output_path: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    output_format: str = "nifti",
    consistency_map: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> BatchReport:
    """Infer a NIfTI file, a DICOM series folder, or every scan under a folder.

    One scan (a file, or a folder holding exactly one DICOM series) is written to `output_path`
    (and `consistency_map`) as given. Otherwise every scan `discover_volumes` finds, sorted by case
    name and cut to this `shard` (i, n), goes to ``output_path/<name>.nii.gz`` (or ``<name>/`` for
    DICOM) and ``consistency_map/<name>.nii.gz``; a failing scan is recorded in the report and the
    others still run. Options as `infer_path`.
    """
    from tqdm import tqdm

    from revgan_med.io import VolumeRef, discover_volumes

    input_path, output_path = Path(input_path), Path(output_path)
    refs = (
        discover_volumes(input_path)
        if input_path.is_dir()
        else [VolumeRef(input_path, None, input_path.name)]
    )
    single = len(refs) == 1 and Path(refs[0].path).resolve() == input_path.resolve()
    if not refs:
        raise ValueError(f"{input_path}: no NIfTI file or DICOM series found")
    for root in () if single else (output_path, consistency_map):
        if root is not None:
            _refuse_overwrite(input_path, Path(root))  # a re-run would otherwise discover its own outputs
    jobs = []
    for ref in [refs[0]] if single else shard_items(sorted(refs, key=lambda r: r.name), *shard):
        out, cmap = output_path, consistency_map
        if not single:
            out = output_path / (ref.name + (".nii.gz" if output_format == "nifti" else ""))
            cmap = None if consistency_map is None else Path(consistency_map) / f"{ref.name}.nii.gz"
        jobs.append((ref, out, cmap))
    report = BatchReport()
    for ref, out, cmap in tqdm(jobs, desc="infer", unit="scan", disable=not progress or single):
        try:
            summary = infer_path(
                model, ref.path, out, series_uid=ref.series_uid, output_format=output_format,
                consistency_map=cmap, **options,
            )  # fmt: skip
        except Exception as exc:  # one bad scan must not stop the batch; reported with its path
            report.failed.append((Path(ref.path), f"{type(exc).__name__}: {exc}".splitlines()[0]))
            continue
        report.done.append((Path(ref.path), out, summary))
    return report
