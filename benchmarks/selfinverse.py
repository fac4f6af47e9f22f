"""Self-inverse vs paired on the real B/L kernel pair: generator parameters and PSNR per direction.

``ct_kernel_pair_philips_B_L`` in the shared data: ONE chest CT acquisition reconstructed with a smooth
(B) and a sharp (L) kernel, voxel-aligned (512×512×20, 0.84 mm in-plane, 5 mm slices); the networks see
the whole scanner range (ct-full, as the kernel configs), PSNR is in the NLST window [-900, 400] HU.
Both objectives learn B → L AND L → B: ``paired`` with the generator pair of the paired objective (two
networks for a plain generator), ``self-inverse`` with ONE network f = f⁻¹ trained by alternating the
directions (half the parameters of the plain pair). Training patches come from the first
60 % of the in-plane y axis, the test slab is the last 30 %; the table gives the generator parameters and
the PSNR of both directions on the test slab, plus the inputs' own PSNR.

The pair has 20 slices, fewer than the 24 the 3D PatchGAN needs, so both objectives run with
``loss.gan: none`` (L1 only; the rows "w/o L_GAN" of the thesis) — the comparison is the same for both.

Default (small, CPU) settings: residual srcnn3d width 8, depth 2 (``--no-residual``: the thesis' plain
generator) with the in-plane linear paths of the kernel configs (``--linear-kernel 7,7,1``; ``none``
leaves them out) and their least-squares start from 32 batches, as ``revgan-med train`` does; 48×48×16
patches; 400 steps, Adam lr 2e-4. The self-inverse network keeps both paths and its domain gate, fitted
on the same 32 batches, picks one per window. Measurements: ``benchmarks/README.md``.

Examples (from the repository root):
  python benchmarks/selfinverse.py
  python benchmarks/selfinverse.py --generator rev_resnet3d --steps 1000 --json selfinverse.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _pairs import (
    SHARED_DATA,
    add_training_run_arguments,
    load_windowed,
    parameter_count,
    psnr_hu,
)
from _pairs import translate as apply

from revgan_med.benchmarks import write_json
from revgan_med.data.transforms import CTWindow
from revgan_med.runtime import resolve_device
from revgan_med.training.quickfit import build, cut, fit, random_origin

DEFAULT_PAIR = SHARED_DATA / "ct_kernel_pair_philips_B_L"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, train both objectives, print the table; returns the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", type=Path, default=DEFAULT_PAIR, help="folder with B/ and L/ DICOM series")
    parser.add_argument("--generator", default="srcnn3d", help="default: %(default)s")
    add_training_run_arguments(parser, steps=400, lr=2e-4, linear_kernel=[7, 7, 1])
    args = parser.parse_args(argv)
    result = run_experiment(
        args.pair, generator=args.generator, steps=args.steps, width=args.width, lr=args.lr,
        residual=args.residual, linear_kernel=args.linear_kernel, device=args.device,
        seed=args.seed,
    )  # fmt: skip
    print(format_table(result))
    write_json(args.json, result)
    return 0


def run_experiment(
    pair: Path,
    *,
    generator: str,
    steps: int,
    width: int,
    lr: float,
    residual: bool = True,
    linear_kernel: list[int] | None = None,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Train paired and self-inverse on the pair; return parameter counts and test PSNRs (plain data)."""
    for kernel in ("B", "L"):
        if not (pair / kernel).is_dir():
            raise ValueError(f"{pair / kernel}: kernel series not found (pass --pair)")
    dev = resolve_device(device)
    window, metric = CTWindow(-1024.0, 3071.0), CTWindow(-900.0, 400.0)  # as configs/ct_kernel_*.yaml
    smooth, sharp = load_windowed(pair / "B", window), load_windowed(pair / "L", window)
    if smooth.shape != sharp.shape:
        raise ValueError(f"{pair}: B {smooth.shape[1:]} and L {sharp.shape[1:]} are not on one grid")
    ny, nz = smooth.shape[2], smooth.shape[3]
    train_y, test_y = int(0.6 * ny), int(0.7 * ny)
    size = [48, 48, min(16, nz)]
    bounds = [(0, smooth.shape[1]), (0, train_y), (0, nz)]

    def batches(step: int) -> dict[str, torch.Tensor]:
        origin = random_origin(np.random.default_rng([seed, step]), bounds, size)
        x, y = cut(smooth, origin, size), cut(sharp, origin, size)
        return {"image": torch.from_numpy(x.copy())[None], "target": torch.from_numpy(y.copy())[None]}

    test_x, test_t = smooth[:, :, test_y:], sharp[:, :, test_y:]
    rows: list[dict[str, Any]] = [
        {"objective": "input (no model)", "parameters": 0,
         "psnr_forward": psnr_hu(test_x, test_t, window, metric),
         "psnr_inverse": psnr_hu(test_t, test_x, window, metric)}
    ]  # fmt: skip
    for name in ("paired", "self-inverse"):
        torch.manual_seed(seed)
        objective, optimizers = build(
            name,
            generator=generator,
            width=width,
            depth=2,
            disc_width=8,
            loss={"gan": "none"},
            patch_size=size,
            residual=residual,
            linear_kernel=linear_kernel,
            lr=lr,
        )
        print(f"objective {name}:")
        seconds = fit(objective, optimizers, batches, steps=steps, device=dev, linear_fit_batches=32)
        objective.eval()
        g = objective.generator
        rows.append({
            "objective": name, "parameters": parameter_count(g), "train_s": seconds,
            "psnr_forward": psnr_hu(apply(g, test_x, dev, context=size), test_t, window, metric),
            "psnr_inverse": psnr_hu(apply(g.inverse, test_t, dev, context=size), test_x, window, metric),
        })  # fmt: skip
    return {"pair": str(pair), "window_hu": [metric.lo, metric.hi], "generator": generator, "width": width,
            "steps": steps, "lr": lr, "residual": residual, "linear_kernel": linear_kernel,
            "device": str(dev), "rows": rows}  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    """Parameters and PSNR of both directions per objective."""
    lo, hi = result["window_hu"]
    lines = [
        f"Self-inverse vs paired, B↔L kernel pair, PSNR in [{lo:g}, {hi:g}] HU on the held-out slab; "
        f"{'residual ' if result['residual'] else ''}{result['generator']} width {result['width']}, "
        f"{result['steps']} steps, lr {result['lr']:g}, {result['device']}",
        "objective | generator parameters | B→L PSNR (dB) | L→B PSNR (dB)",
        "--- | --- | --- | ---",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['objective']} | {r['parameters']} | {r['psnr_forward']:.2f} | {r['psnr_inverse']:.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
