"""Sliding-window prediction of whole volumes on tensors (no files, no checkpoints; thesis ``000_*`` §5.4).

Each target window is predicted from a context window centred on it; only the centres are kept, so
every voxel is predicted exactly once and there are no seams. `auto_windows` sizes the windows so
that the work is close to one pass over the volume: targets as large as a voxel budget allows, each
with a margin of the network's receptive radius. Used by training (validation) and inference alike.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from monai.data.utils import dense_patch_slices
from monai.transforms.croppad.functional import pad_nd

from revgan_med.runtime import amp_dtype, autocast, resolve_device

Predictor = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_WINDOW_VOXELS = 1 << 24  # 256³: a rev_srcnn3d of width 32 holds ~10 GB of float32 features
DEFAULT_MARGIN = 16  # receptive radius assumed for a predictor that does not report its own


def triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """One positive int for all three axes, or three positive ints."""
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    return values  # type: ignore[return-value]


def auto_windows(
    spatial_shape: Sequence[int], *, margin: int, max_voxels: int = DEFAULT_WINDOW_VOXELS
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(target, context)`` per axis: the fewest windows whose contexts (target + 2·`margin`) each
    hold at most `max_voxels`, targets split evenly along each axis.

    Splits the axis with the largest context first, so windows stay near-cubic. With the volume fitting
    the budget this is one window: the cost of one pass plus the margins.
    """
    if margin < 0 or max_voxels < 1:
        raise ValueError(f"auto_windows: need margin >= 0 and max_voxels >= 1, got {margin}, {max_voxels}")
    sizes = [int(s) for s in spatial_shape]
    tiles = [1, 1, 1]

    def shape() -> tuple[list[int], list[int]]:
        target = [-(-s // n) for s, n in zip(sizes, tiles, strict=True)]
        return target, [t + 2 * margin for t in target]

    target, context = shape()
    while math.prod(context) > max_voxels and any(t > 1 for t in target):
        axis = max((a for a in range(3) if target[a] > 1), key=lambda a: context[a])
        tiles[axis] += 1
        target, context = shape()
    return tuple(target), tuple(context)  # type: ignore[return-value]


def window_sizes(
    spatial_shape: Sequence[int],
    *,
    patch_size: Sequence[int],
    margin: int,
    target_size: int | Sequence[int] | None = None,
    context_size: int | Sequence[int] | None = None,
    max_voxels: int = DEFAULT_WINDOW_VOXELS,
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(target, context)`` per axis: both given as they are; only a context → target = context −
    2·`margin`; only a target → context = the training `patch_size` (InstanceNorm statistics as in
    training; thesis: 64³ in 128³), or target + 2·`margin` along axes where the target exceeds the
    patch; neither → `auto_windows` for this volume (about one pass of the network)."""
    if target_size is None and context_size is None:
        return auto_windows(spatial_shape, margin=margin, max_voxels=max_voxels)
    if target_size is None:
        context = triple(context_size, "context_size")
        return tuple(max(1, c - 2 * margin) for c in context), context  # type: ignore[return-value]
    target = triple(target_size, "target_size")
    if context_size is None:
        pairs = zip(triple(patch_size, "patch_size"), target, strict=True)
        return target, tuple(p if t <= p else t + 2 * margin for p, t in pairs)  # type: ignore[return-value]
    return target, triple(context_size, "context_size")


def predict_volume(
    fn: Predictor,
    volume: torch.Tensor,
    *,
    patch_size: Sequence[int],
    margin: int,
    target_size: int | Sequence[int] | None = None,
    context_size: int | Sequence[int] | None = None,
    max_voxels: int = DEFAULT_WINDOW_VOXELS,
    **options: object,
) -> tuple[torch.Tensor, tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """`sliding_window_predict` (`options`) with `window_sizes`'s windows → (prediction, (target, context)).

    Automatic windows (neither size given) that run out of accelerator memory are retried with a
    quarter of the voxels per context, with a warning, down to the training patch's size (which
    training fitted with its backward pass): the default budget suits a large GPU, not every GPU, and
    validation shares the GPU with the training state. Windows the caller chose are never changed;
    their out-of-memory error stands.
    """
    spatial = tuple(volume.shape[2:])
    chosen = target_size is not None or context_size is not None
    floor = math.prod(triple(patch_size, "patch_size"))
    while True:
        target, context = window_sizes(spatial, patch_size=patch_size, margin=margin, target_size=target_size,
                                       context_size=context_size, max_voxels=max_voxels)  # fmt: skip
        try:
            out = sliding_window_predict(fn, volume, target_size=target, context_size=context, **options)
            return out, (target, context)
        except torch.OutOfMemoryError:
            if chosen or math.prod(context) <= floor:
                raise
        # outside the handler: the failed attempt's tensors are released before the cache is
        max_voxels = math.prod(context) // 4
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        warnings.warn(f"out of accelerator memory with {'×'.join(map(str, context))} context windows: "
                      f"retrying with at most {max_voxels} voxels per window", stacklevel=2)  # fmt: skip


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


def _output_device(run_device: torch.device, volume: torch.Tensor, nbytes: int) -> torch.device:
    """Accumulate on the accelerator when the output fits in a quarter of its free memory."""
    if run_device.type == "cuda" and volume.device.type == "cpu":
        free, _ = torch.cuda.mem_get_info(run_device)
        return run_device if nbytes < free // 4 else volume.device
    return volume.device


def pad_volume(
    volume: torch.Tensor, pad: Sequence[tuple[int, int]], *, mode: str = "odd-reflect"
) -> torch.Tensor:
    """Pad a (B, C, X, Y, Z) tensor by ``pad[d] = (before, after)`` voxels along each spatial axis.

    ``odd-reflect``: the point reflection about each edge voxel, ``v[-k] = 2·v[0] − v[k]`` (NumPy's
    ``np.pad(mode="reflect", reflect_type="odd")``, through MONAI's `pad_nd`: ``F.pad`` lacks it), clamped
    to the volume's range per image and channel (a network saw no values beyond it). Within that range
    it continues a ramp exactly, so a symmetric sharpening or smoothing filter leaves an edge voxel as
    it is instead of answering an edge that the padding made. Other modes: ``F.pad``'s.
    """
    to_pad = [(0, 0), (0, 0), *pad]
    if mode != "odd-reflect":
        return pad_nd(volume, to_pad, mode=mode)
    spatial = tuple(range(2, volume.ndim))
    padded = pad_nd(volume.cpu(), to_pad, mode="reflect", reflect_type="odd").to(volume.device)  # NumPy: CPU
    return padded.clamp(volume.amin(dim=spatial, keepdim=True), volume.amax(dim=spatial, keepdim=True))


def with_border(
    fn: Predictor, volume: torch.Tensor, radius: Sequence[int], *, mode: str = "odd-reflect"
) -> torch.Tensor:
    """`fn` (shape-keeping, e.g. a filter of that radius) of `volume` padded by `radius` voxels per spatial
    axis with `mode` (`pad_volume`), cropped back to the volume: a whole-volume filter that sees the same
    border as the windows of `sliding_window_predict`."""
    pad = [(r, r) for r in radius]
    inner = tuple(slice(r, r + n) for r, n in zip(radius, volume.shape[2:], strict=True))
    return fn(pad_volume(volume, pad, mode=mode))[(slice(None), slice(None), *inner)]


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
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Apply `fn` to `volume` (B, C, X, Y, Z) window by window; returns (B, C', X, Y, Z) float32.

    `fn` maps a batch of context windows (N, C, *context) to (N, C', *context). Each target window
    is cut from the centre of its context window's prediction, so every voxel is predicted once,
    from a context centred on it. Borders are padded with `padding_mode` (`pad_volume`): ``replicate``
    by default, ``odd-reflect`` to continue the edge's gradient (the task decides:
    `revgan_med.tasks.BORDER_PADDING`). `device`
    runs `fn` (None: the volume's device); with `amp` under `revgan_med.runtime`'s autocast policy.
    The result is on the volume's device; on CUDA windows go through pinned memory with non-blocking
    copies and the output is accumulated on the GPU when it fits. `progress(done, total)` is called
    after every batch of windows.

    Ours rather than MONAI's `sliding_window_inference`: MONAI blends every overlapping window with
    its importance map, so "64 in 128" through a near-zero `roi_weight_map` is only approximately the
    centre prediction and accumulates 8× the voxels into a full-size buffer plus a count map; here
    each window writes its centre once. The window grid is MONAI's `dense_patch_slices`.
    """
    if volume.ndim != 5:
        raise ValueError(f"volume must be (B, C, X, Y, Z), got shape {tuple(volume.shape)}")
    target, context = triple(target_size, "target_size"), triple(context_size, "context_size")
    if any(t > c for t, c in zip(target, context, strict=True)):
        raise ValueError(f"target_size {target} must not exceed context_size {context}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    run_device = resolve_device(device) if device is not None else volume.device
    spatial = tuple(volume.shape[2:])
    pad, windows = window_grid(spatial, target_size=target, context_size=context)
    padded = pad_volume(volume.float(), pad, mode=padding_mode)
    jobs = [(b, w) for b in range(volume.shape[0]) for w in windows]
    centre = tuple(slice(before, before + t) for (before, _), t in zip(pad, target, strict=True))
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    pinned = run_device.type == "cuda" and padded.device.type == "cpu"
    out: torch.Tensor | None = None
    with torch.inference_mode(), autocast(run_device, amp_dtype(run_device, amp)):
        for first in range(0, len(jobs), batch_size):
            chunk = jobs[first : first + batch_size]
            batch = torch.stack([padded[(b, slice(None), *w)] for b, w in chunk])
            batch = batch.pin_memory() if pinned else batch
            pred = fn(batch.to(run_device, non_blocking=True).contiguous(memory_format=memory_format))
            if tuple(pred.shape[2:]) != context or pred.shape[0] != len(chunk):
                raise ValueError(
                    f"predictor returned shape {tuple(pred.shape)} for windows {tuple(batch.shape)}; "
                    "it must keep the batch and spatial size"
                )
            if out is None:
                shape = (volume.shape[0], pred.shape[1], *spatial)
                where = _output_device(run_device, volume, 4 * math.prod(shape))
                out = torch.empty(shape, dtype=torch.float32, device=where)
            centres = pred[(slice(None), slice(None), *centre)].float().to(out.device)
            for (b, w), tile in zip(chunk, centres, strict=True):
                # padded window start k*t is the original tile start; the last tile is cropped to the volume
                size = [min(t, n - s.start) for s, t, n in zip(w, target, spatial, strict=True)]
                dst = tuple(slice(s.start, s.start + m) for s, m in zip(w, size, strict=True))
                out[(b, slice(None), *dst)] = tile[(slice(None), *(slice(0, m) for m in size))]
            if progress is not None:
                progress(first + len(chunk), len(jobs))
    assert out is not None  # at least one window always exists
    return out.to(volume.device)
