"""RegGAN misalignment experiment (issue 7 item 3): paired L1 vs reggan on pairs misaligned on purpose.

Real CT (``ct_chest_1p5mm/chest_ct.nii.gz`` in the shared data, 1.5 mm isotropic) in the chest window
[-1150, 350] HU. Task: through-plane super-resolution, input x = 4× thick slices (block average along z)
interpolated back to the 1.5 mm grid, target y = the scan. Training patches come from z < 60 % of the
scan; every training pair gets INDEPENDENT random affines of source and target at the RegGAN noise level
(`revgan_med.data.misalign`: rotation ≤ level°, translation ≤ 0.02·level of the context box, scale
1 ± 0.02·level; fresh each step, known and reported as the mean voxel misalignment). The test slab
(z ≥ 70 %) is never misaligned: the table is the PSNR of F(x) against the ALIGNED target, per noise level
and objective: ``paired`` (λ_L1 100 + conditional GAN) and ``reggan`` (Corr 20 + Smooth 10 + Adv 1,
registration net trained with the generator), plus the input's own PSNR for reference.

Default (small, CPU) settings: residual rev_resnet3d width 8, depth 2 (``--no-residual``: the
thesis' plain generator, which must learn the identity first); PatchGAN width 8; R width 8, 2 levels;
32³ patches cut from 48³ misaligned boxes; 300 steps, batch 1, Adam lr 2e-4; noise levels 0, 2, 5.
About 2 s per step on 2 shared CPU cores — the whole table takes tens of minutes; use --steps to trade
time for quality. Short runs show the trend, not converged values.

Examples:
  revgan-med benchmark reggan
  revgan-med benchmark reggan --levels 0,5 --steps 200 --json reggan.json
  revgan-med benchmark reggan --device cuda --steps 3000 --width 16 --patch 64
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from revgan_med.benchmarks import add_training_run_arguments, write_json

HELP = "RegGAN claim in 3D: PSNR of paired vs reggan training on CT pairs misaligned by noise level"
DEFAULT_SCAN = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct_chest_1p5mm" / "chest_ct.nii.gz"
)
OBJECTIVES = ("paired", "reggan")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scan", type=Path, default=DEFAULT_SCAN, help="CT volume (default: the shared chest CT)"
    )
    parser.add_argument("--levels", default="0,2,5", help="RegGAN noise levels (default: %(default)s)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="default: %(default)s")
    add_training_run_arguments(parser, steps=300, lr=2e-4)
    parser.add_argument("--patch", type=int, default=32, help="training patch side (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    levels = [float(v) for v in args.levels.split(",")]
    objectives = [v.strip() for v in args.objectives.split(",")]
    result = run_experiment(
        args.scan, levels=levels, objectives=objectives, steps=args.steps, patch=args.patch,
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
    import numpy as np
    import torch

    from revgan_med.benchmarks._pairs import build, fit, load_windowed, psnr_hu, translate
    from revgan_med.config import LossConfig
    from revgan_med.data.degradation import thick_slice, upsample_to_hr
    from revgan_med.data.transforms import CTWindow
    from revgan_med.inference import resolve_device

    if not scan.exists():
        raise ValueError(f"{scan}: scan not found (pass --scan)")
    dev = resolve_device(device)
    window = CTWindow(-1150.0, 350.0)
    target = load_windowed(scan, window)
    factors = (1, 1, 4)
    thick, thick_affine = thick_slice(target[0], np.eye(4), factors)
    source = upsample_to_hr(thick, thick_affine, factors, mode="trilinear", hr_shape=target.shape[1:])[0]
    source = source[None]
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
            loss = LossConfig(gan="lsgan", registration_width=8, registration_levels=2)
            objective = build(
                name,
                generator="rev_resnet3d",
                width=width,
                depth=2,
                disc_width=8,
                loss=loss,
                residual=residual,
                linear_kernel=linear_kernel,
            )
            print(f"noise level {level:g}, objective {name}:")
            seconds = fit(objective, sampler, steps=steps, lr=lr, device=dev)
            objective.eval()
            prediction = translate(objective.generator, test_x, dev, context=[patch] * 3)
            rows.append({"objective": name, "level": level, "psnr": psnr_hu(prediction, test_y, window),
                         "misalignment_vox": sampler.mean_misalignment(), "train_s": seconds})  # fmt: skip
            print(f"  test PSNR {rows[-1]['psnr']:.2f} dB")
    return {"scan": str(scan), "window_hu": [window.lo, window.hi], "steps": steps, "patch": patch,
            "width": width, "lr": lr, "residual": residual, "linear_kernel": linear_kernel,
            "device": str(dev), "rows": rows}  # fmt: skip


class _MisalignedPatches:
    """Step → batch of one (source, target) patch pair with independent RegGAN affines of `level`."""

    def __init__(self, source, target, *, level: float, patch: int, seed: int) -> None:
        self.source, self.target, self.level, self.patch, self.seed = source, target, level, patch, seed
        self.box = patch + patch // 2  # context box: the affines' border effects stay outside the patch
        self.displacements: list[float] = []

    def __call__(self, step: int) -> dict:
        import numpy as np
        import torch

        from revgan_med.benchmarks._pairs import cut, random_origin
        from revgan_med.data.misalign import misalign_pair

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
        f"RegGAN misalignment experiment — PSNR of F(x) vs the aligned target in [{lo:g}, {hi:g}] HU, "
        f"{result['steps']} steps, {result['patch']}³ patches, width {result['width']}, "
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
    lines.append(f"input (thick slices, no model): {base['psnr']:.2f} dB")
    return "\n".join(lines)
