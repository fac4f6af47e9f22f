"""RegGAN misalignment experiment: paired L1 vs reggan on CT pairs misaligned on purpose.

Real CT (``ct_chest_1p5mm/chest_ct.nii.gz`` in the shared data, 1.5 mm isotropic) in the chest window
[-1150, 350] HU. Tasks (``--task``): ``kernel`` (default), sharp → smooth kernel conversion between the
two reconstructions of `revgan_med.data.degradation.simulate_kernel_pair` (a SIMULATED kernel pair:
Gaussian MTFs and FBP-shaped noise of 35 and 8 HU on the real anatomy); ``sr``, through-plane
super-resolution, x = 4× thick slices (block average along z) interpolated back to the 1.5 mm grid,
y = the scan. Training patches come from z < 60 % of the scan; every training pair gets INDEPENDENT
random affines of source and target at the RegGAN noise level (`revgan_med.data.misalign`: rotation
≤ level°, translation ≤ 0.02·level of the context box, scale 1 ± 0.02·level; fresh each step, known and
reported as the mean voxel misalignment). The test slab (z ≥ 70 %) is never misaligned: the table is
the PSNR of F(x) against the ALIGNED target, per noise level and objective: ``paired`` (λ_L1 100) and
``reggan`` (Corr 20 + Smooth 10, registration net trained with the generator), plus the input's own PSNR.
The adversarial terms are off by default (``--gan none``): the claim is about the correction.

Default (small, CPU) settings: residual rev_resnet3d width 8, depth 2 (``--no-residual``: the
thesis' plain generator); PatchGAN width 8; R width 8, 2 levels; 32³ patches cut from 48³ misaligned
boxes; 400 steps, batch 1, Adam lr 2e-4; noise levels 0, 2, 5. Measurements: ``benchmarks/README.md``.

Examples (from the repository root):
  python benchmarks/reggan.py
  python benchmarks/reggan.py --levels 0,5 --json reggan.json
  python benchmarks/reggan.py --task sr --gan lsgan --steps 3000 --lr 2e-4 --device cuda --width 16
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
    psnr_hu,
    translate,
)

from revgan_med.benchmarks import write_json
from revgan_med.data.degradation import simulate_kernel_pair, thick_slice, upsample_to_hr
from revgan_med.data.misalign import misalign_pair
from revgan_med.data.transforms import CTWindow
from revgan_med.io import load_volume
from revgan_med.runtime import resolve_device
from revgan_med.training.quickfit import build, cut, fit, random_origin

DEFAULT_SCAN = SHARED_DATA / "ct_chest_1p5mm" / "chest_ct.nii.gz"
OBJECTIVES = ("paired", "reggan")
TASKS = ("sr", "kernel")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run every (level, objective), print the table; returns the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scan", type=Path, default=DEFAULT_SCAN, help="CT volume (default: the shared chest CT)"
    )
    parser.add_argument("--levels", default="0,2,5", help="RegGAN noise levels (default: %(default)s)")
    parser.add_argument("--task", choices=TASKS, default="kernel", help="default: %(default)s")
    parser.add_argument("--gan", choices=("lsgan", "vanilla", "none"), default="none",
                        help="adversarial loss of both objectives (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--registration-levels", type=int, default=2, help="levels of R (default: %(default)s)"
    )
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="default: %(default)s")
    add_training_run_arguments(parser, steps=400, lr=2e-4)
    parser.add_argument("--patch", type=int, default=32, help="training patch side (default: %(default)s)")
    args = parser.parse_args(argv)
    levels = [float(v) for v in args.levels.split(",")]
    objectives = [v.strip() for v in args.objectives.split(",")]
    result = run_experiment(
        args.scan, levels=levels, task=args.task, gan=args.gan, registration_levels=args.registration_levels,
        objectives=objectives, steps=args.steps, patch=args.patch,
        width=args.width, lr=args.lr, residual=args.residual, linear_kernel=args.linear_kernel,
        device=args.device, seed=args.seed,
    )  # fmt: skip
    print(format_table(result))
    write_json(args.json, result)
    return 0


def run_experiment(
    scan: Path,
    *,
    levels: list[float],
    task: str = "kernel",
    gan: str = "none",
    registration_levels: int = 2,
    objectives: list[str],
    steps: int,
    patch: int,
    width: int,
    lr: float = 2e-4,
    residual: bool = True,
    linear_kernel: list[int] | None = None,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Train every (level, objective) run and return the PSNR table (plain data)."""
    if not scan.exists():
        raise ValueError(f"{scan}: scan not found (pass --scan)")
    dev = resolve_device(device)
    window = CTWindow(-1150.0, 350.0)
    source, target = _task_pair(scan, task, window)
    nz = target.shape[3]
    train_z, test_z = int(0.6 * nz), int(0.7 * nz)
    test_x, test_y = source[..., test_z:], target[..., test_z:]
    rows: list[dict[str, Any]] = [
        {"objective": "input (no model)", "level": None, "psnr": psnr_hu(test_x, test_y, window)}
    ]
    for level in levels:
        sampler = _MisalignedPatches(
            source[..., :train_z], target[..., :train_z], level=level, patch=patch, seed=seed
        )
        for name in objectives:
            torch.manual_seed(seed)
            loss = {"gan": gan, "registration_width": 8, "registration_levels": registration_levels}
            objective, optimizers = build(
                name,
                generator="rev_resnet3d",
                width=width,
                depth=2,
                disc_width=8,
                loss=loss,
                patch_size=[patch] * 3,
                residual=residual,
                linear_kernel=linear_kernel,
                lr=lr,
            )
            print(f"noise level {level:g}, objective {name}:")
            seconds = fit(objective, optimizers, sampler, steps=steps, device=dev)
            objective.eval()
            prediction = translate(objective.generator, test_x, dev, context=[patch] * 3)
            rows.append({"objective": name, "level": level, "psnr": psnr_hu(prediction, test_y, window),
                         "misalignment_vox": sampler.mean_misalignment(), "train_s": seconds})  # fmt: skip
            print(f"  test PSNR {rows[-1]['psnr']:.2f} dB")
    return {"scan": str(scan), "task": task, "gan": gan, "registration_levels": registration_levels,
            "window_hu": [window.lo, window.hi], "steps": steps, "patch": patch,
            "width": width, "lr": lr, "residual": residual, "linear_kernel": linear_kernel,
            "device": str(dev), "rows": rows}  # fmt: skip


def _task_pair(scan: Path, task: str, window: CTWindow) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of `task` on the scan, both ``(1, X, Y, Z)`` in `window` network units."""
    hu, affine = load_volume(scan)
    if hu.ndim != 3:
        raise ValueError(f"{scan}: expected a 3D CT volume, got shape {hu.shape}")
    hu = np.asarray(hu, dtype=np.float32)
    if task == "kernel":
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        smooth, sharp = simulate_kernel_pair(hu, spacing, seed=0)
        source, target = window.normalize(sharp), window.normalize(smooth)
    elif task == "sr":
        target = window.normalize(hu)
        factors = (1, 1, 4)
        thick, thick_affine = thick_slice(target, np.eye(4), factors)
        source = upsample_to_hr(thick, thick_affine, factors, mode="trilinear", hr_shape=target.shape)[0]
    else:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    return source[None].astype(np.float32), target[None].astype(np.float32)


class _MisalignedPatches:
    """Step → batch of one (source, target) patch pair with independent RegGAN affines of `level`."""

    def __init__(self, source, target, *, level: float, patch: int, seed: int) -> None:
        self.source, self.target, self.level, self.patch, self.seed = source, target, level, patch, seed
        self.box = patch + patch // 2  # context box: the affines' border effects stay outside the patch
        self.displacements: list[float] = []

    def __call__(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        bounds = [(0, n) for n in self.source.shape[1:]]
        origin = random_origin(rng, bounds, [self.box] * 3)
        x, y = cut(self.source, origin, [self.box] * 3), cut(self.target, origin, [self.box] * 3)
        x, y, a_x, a_y = misalign_pair(x, y, noise_level=self.level, seed=int(rng.integers(2**31)))
        margin = (self.box - self.patch) // 2
        inner = slice(margin, margin + self.patch)
        grid = np.stack(np.meshgrid(*[np.arange(margin, margin + self.patch)] * 3, indexing="ij"), -1)
        points = np.concatenate([grid.reshape(-1, 3), np.ones((grid[..., 0].size, 1))], 1)
        # where each patch voxel of x and of y came from in the scan: their distance is the misalignment
        self.displacements.append(float(np.linalg.norm(points @ (a_x - a_y).T, axis=1).mean()))
        return {
            "image": torch.as_tensor(x[:, inner, inner, inner])[None].float(),
            "target": torch.as_tensor(y[:, inner, inner, inner])[None].float(),
        }

    def mean_misalignment(self) -> float:
        return float(sum(self.displacements) / max(1, len(self.displacements)))


def format_table(result: dict[str, Any]) -> str:
    """The PSNR table: one row per noise level, one column per objective."""
    rows = result["rows"]
    objectives = list(dict.fromkeys(r["objective"] for r in rows if r["level"] is not None))
    levels = list(dict.fromkeys(r["level"] for r in rows if r["level"] is not None))
    lo, hi = result["window_hu"]
    head = ["noise level", "misalignment (vox)", *[f"{o} PSNR (dB)" for o in objectives]]
    lines = [
        f"RegGAN misalignment experiment ({result['task']} task, adversarial loss {result['gan']}) — PSNR "
        f"of F(x) vs the aligned target in [{lo:g}, {hi:g}] HU, {result['steps']} steps, "
        f"{result['patch']}³ patches, width {result['width']}, "
        f"lr {result['lr']:g}, {'residual' if result['residual'] else 'plain'} generator, {result['device']}",
        " | ".join(head),
        " | ".join("---" for _ in head),
    ]
    for level in levels:
        cells = {r["objective"]: r for r in rows if r["level"] == level}
        shift = sum(c["misalignment_vox"] for c in cells.values()) / len(cells)
        lines.append(
            " | ".join([f"{level:g}", f"{shift:.2f}", *[f"{cells[o]['psnr']:.2f}" for o in objectives]])
        )
    base = next(r for r in rows if r["level"] is None)
    lines.append(f"input ({result['task']} task, no model): {base['psnr']:.2f} dB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
