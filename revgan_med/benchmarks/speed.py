"""Inference speed: voxels/s of our sliding window vs a naive per-window loop vs MONAI, same windows.

A phantom CT (default 192×192×96, in network units) is reconstructed by a randomly initialised
generator (default rev_resnet3d, width 16, depth 4) with target windows (default 32³) predicted from
centred context windows (default 64³), three ways that must agree within 1e-5:

- ``revgan-med``: `revgan_med.tiling.sliding_window_predict` — batched windows, ``inference_mode``,
  optional channels-last 3D memory format, each window writes only its centre;
- ``naive``: a Python loop over the same context windows, one at a time, ``no_grad``, default layout;
- ``monai``: MONAI's ``sliding_window_inference`` (what ``SlidingWindowInferer`` runs) over the same
  pre-padded volume with the same windows and a ``roi_weight_map`` of 1 on the centre and 1e-8
  elsewhere (it blends every overlap);

plus ``forward only``: the generator on the same number of context windows without extracting or
stitching — the ceiling for any sliding window; ``auto windows``: the `infer` default (windows as
large as the voxel budget allows, the generator's receptive radius as margin; InstanceNorm then sees
other statistics, so its output differs); ``one window``: the generator on the whole volume at once.
The ``time / one window`` column is each method's cost relative to that single pass. Each method
is timed `--repeats` times after one warm-up window; the best time counts.

Examples:
  revgan-med benchmark speed
  revgan-med benchmark speed --shape 96,96,48 --batch-size 4 --json speed.json
  revgan-med benchmark speed --device cuda --shape 384,384,192 --context 128 --target 64 --width 32
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from revgan_med.benchmarks import write_json

HELP = "inference voxels/s: our sliding window vs a naive window loop vs MONAI SlidingWindowInferer"
TOLERANCE = 1e-5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="192,192,96", help="volume X,Y,Z (default: %(default)s)")
    parser.add_argument("--generator", default="rev_resnet3d", help="default: %(default)s")
    parser.add_argument("--width", type=int, default=16, help="generator width (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=4, help="core depth (default: %(default)s)")
    parser.add_argument("--context", type=int, default=64, help="context window edge (default: %(default)s)")
    parser.add_argument("--target", type=int, default=32, help="target window edge (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=4, help="windows per pass, ours and MONAI (%(default)s)"
    )
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=False,
        help="channels-last 3D memory format for our windows (default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per method, best counts (%(default)s)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    try:
        shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
        raise ValueError(f"--shape {args.shape!r}: expected X,Y,Z integers") from None
    result = run_benchmark(
        shape=shape, generator=args.generator, width=args.width, depth=args.depth, context=args.context,
        target=args.target, batch_size=args.batch_size, channels_last=args.channels_last,
        repeats=args.repeats, threads=args.threads, device=args.device,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )  # fmt: skip
    print(format_table(result))
    write_json(args.json, result)
    return 0 if result["identical"] else 1


def _naive(model: Callable, volume: Any, *, target: int, context: int) -> Any:
    """The straightforward loop: every context window alone, ``no_grad``, centre copied out."""
    import torch
    import torch.nn.functional as F

    from revgan_med.tiling import window_grid

    spatial = volume.shape[2:]
    pad, windows = window_grid(spatial, target_size=(target,) * 3, context_size=(context,) * 3)
    padded = F.pad(volume, [p for pair in reversed(pad) for p in pair], mode="replicate")
    out = torch.empty_like(volume)
    with torch.no_grad():
        for w in windows:
            pred = model(padded[(slice(None), slice(None), *w)].to(next(model.parameters()).device))
            starts = [s.start for s in w]
            sizes = [min(target, n - s) for s, n in zip(starts, spatial, strict=True)]
            centre = [slice(b, b + m) for (b, _), m in zip(pad, sizes, strict=True)]
            dst = [slice(s, s + m) for s, m in zip(starts, sizes, strict=True)]
            out[(slice(None), slice(None), *dst)] = pred[(slice(None), slice(None), *centre)].cpu()
    return out


def _monai(model: Callable, volume: Any, *, target: int, context: int, batch_size: int, device: Any) -> Any:
    """MONAI's sliding window on our padded volume: same windows, blended with a centre weight map."""
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from revgan_med.tiling import window_grid

    spatial = volume.shape[2:]
    pad, _ = window_grid(spatial, target_size=(target,) * 3, context_size=(context,) * 3)
    padded = F.pad(volume, [p for pair in reversed(pad) for p in pair], mode="replicate")
    weight = torch.full((context,) * 3, 1e-8)  # ~0, not 0: windows overlapping only by their margins
    lo = (context - target) // 2
    weight[lo : lo + target, lo : lo + target, lo : lo + target] = 1.0
    # MONAI's step is int(roi * (1 - overlap)): a hair under (c - t)/c gives exactly `target`. The
    # function SlidingWindowInferer calls, because the class takes no roi_weight_map argument.
    with torch.inference_mode():
        full = sliding_window_inference(
            padded, context, batch_size, model, overlap=(context - target) / context - 1e-6,
            roi_weight_map=weight, sw_device=device, device=torch.device("cpu"),
        )  # fmt: skip
    crop = tuple(slice(b, b + n) for (b, _), n in zip(pad, spatial, strict=True))
    return full[(slice(None), slice(None), *crop)]


def run_benchmark(
    *, shape: tuple[int, ...] = (192, 192, 96), generator: str = "rev_resnet3d", width: int = 16,
    depth: int = 4, context: int = 64, target: int = 32, batch_size: int = 4, channels_last: bool = False,
    repeats: int = 1, threads: int = 0, device: str = "auto", progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Time the three sliding windows and the forward-only ceiling; return plain data."""
    import torch

    from revgan_med.data.phantom import make_phantom
    from revgan_med.data.transforms import CTWindow
    from revgan_med.networks import build_generator
    from revgan_med.runtime import resolve_device
    from revgan_med.tiling import auto_windows, sliding_window_predict, window_grid

    if len(shape) != 3 or min(shape) < 1 or not 1 <= target <= context or repeats < 1 or batch_size < 1:
        raise ValueError("benchmark speed: need a 3D shape, 1 <= target <= context, repeats >= 1, batch >= 1")
    if threads:
        torch.set_num_threads(threads)
    run_device = resolve_device(device)
    torch.manual_seed(0)
    model = build_generator(generator, in_channels=1, out_channels=1, width=width, depth=depth)
    model = model.to(run_device).eval()
    hu, _ = make_phantom(shape, seed=0)
    volume = torch.from_numpy(CTWindow(-1150.0, 350.0).normalize(hu))[None, None]
    n_windows = len(window_grid(shape, target_size=(target,) * 3, context_size=(context,) * 3)[1])
    batch = torch.zeros((batch_size, 1, context, context, context), device=run_device)

    def forward_only() -> None:
        with torch.inference_mode():
            for first in range(0, n_windows, batch_size):
                model(batch[: min(batch_size, n_windows - first)])

    methods: dict[str, Callable[[], Any]] = {
        "revgan-med": lambda: sliding_window_predict(
            model,
            volume,
            target_size=target,
            context_size=context,
            batch_size=batch_size,
            device=run_device,
            channels_last=channels_last,
        ),  # fmt: skip
        "naive": lambda: _naive(model, volume, target=target, context=context),
        "monai": lambda: _monai(
            model, volume, target=target, context=context, batch_size=batch_size, device=run_device
        ),
        "forward only": forward_only,
        # the `infer` default: windows as large as the budget allows, the receptive radius as margin
        "auto windows": lambda: sliding_window_predict(
            model, volume, target_size=auto[0], context_size=auto[1], batch_size=batch_size, device=run_device
        ),
        "one window": lambda: one_window(),
    }
    auto = auto_windows(shape, margin=model.receptive_radius())

    def one_window() -> torch.Tensor:
        with torch.inference_mode():
            return model(volume.to(run_device)).float().cpu()

    with torch.inference_mode():
        for warm in (batch[:1], batch):  # warm-up of both batch shapes: allocator, oneDNN / cuDNN kernels
            model(warm)
    rows, outputs = [], {}
    for name, fn in methods.items():
        best = float("inf")
        for _ in range(repeats):
            if run_device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[name] = fn()
            if run_device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        rows.append({"method": name, "seconds": best, "voxels_per_s": volume.numel() / best})
        if progress:
            progress(f"{name}: {best:.2f} s")
    naive_s = next(r["seconds"] for r in rows if r["method"] == "naive")
    one_s = next(r["seconds"] for r in rows if r["method"] == "one window")
    for row in rows:
        row["speedup_vs_naive"] = naive_s / row["seconds"]
        row["vs_one_window"] = row["seconds"] / one_s
        out, ours = outputs[row["method"]], outputs["revgan-med"]
        row["max_abs_diff"] = None if out is None else float((out.float() - ours).abs().max())
    # the same windows must agree; other windows differ by their InstanceNorm statistics (reported only)
    same = ("revgan-med", "naive", "monai")
    identical = all(r["max_abs_diff"] <= TOLERANCE for r in rows if r["method"] in same)
    return {
        "device": str(run_device), "threads": torch.get_num_threads(), "shape": list(shape),
        "generator": generator, "width": width, "depth": depth, "context": context, "target": target,
        "batch_size": batch_size, "channels_last": channels_last, "windows": n_windows, "rows": rows,
        "tolerance": TOLERANCE, "identical": identical, "auto_target": list(auto[0]),
        "auto_context": list(auto[1]),
    }  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    """The printed table: one line per method."""
    head = (
        f"speed: {result['generator']} width {result['width']} depth {result['depth']}, volume "
        f"{'x'.join(map(str, result['shape']))}, {result['windows']} windows {result['target']}^3 in "
        f"{result['context']}^3, batch {result['batch_size']}, {result['device']} "
        f"({result['threads']} threads)"
    )
    lines = [head, f"{'method':<14}{'seconds':>10}{'Mvoxel/s':>11}{'vs naive':>10}{'time / one window':>19}"
             f"{'max |diff|':>13}"]  # fmt: skip
    for r in result["rows"]:
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(
            f"{r['method']:<14}{r['seconds']:>10.2f}{r['voxels_per_s'] / 1e6:>11.3f}"
            f"{r['speedup_vs_naive']:>9.2f}x{r['vs_one_window']:>18.2f}x{diff:>13}"
        )
    verdict = "yes" if result["identical"] else "NO"
    lines.append(f"revgan-med, naive and monai identical within {result['tolerance']:g}: {verdict}; "
                 f"auto windows {'x'.join(map(str, result['auto_target']))} in "
                 f"{'x'.join(map(str, result['auto_context']))}")  # fmt: skip
    return "\n".join(lines)
