"""Does an error map predict the error? Calibration of candidate maps on held-out real CT.

Uses the models that ``python benchmarks/quality.py all --workdir W`` trains (sr on the chest CT
below 70 % of its height; kernel on the x < 256 half of the Philips B/L pair) and their held-out
tests: the abdomen CT (another patient, 3 mm) and the chest slab above the training part for sr, the
x ≥ 256 half in both directions for kernel. For every test it scores, with `errormap.calibration`
(mean |error| in the top 5 % flagged voxels vs the rest, Spearman over 8³ blocks, in the metric
window):

- ``cycle``: |G(F(x)) − x| (``infer --consistency-map``);
- ``flips``: `errormap.flip_disagreement` (``infer --error-map``);
- ``correction``: |F(x) − x| on the output grid, the size of the model's change (no extra inference);
- ``input gradient``: the gradient magnitude of the (upsampled) input, a model-free edge detector.

Examples:
  python benchmarks/quality.py all --sr-steps 300 --kernel-steps 200 --workdir runs/quality
  python benchmarks/error_map.py --workdir runs/quality --json error_map.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from quality import FACTORS, KERNEL_WINDOW, SHARED_DATA, SR_WINDOW, split_slab

from revgan_med.data.degradation import thick_slice, upsample_to_hr
from revgan_med.errormap import calibration, flip_disagreement
from revgan_med.inference import infer_volume, load_model
from revgan_med.io import load_volume


def _gradient(volume: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(g.astype(np.float64) ** 2 for g in np.gradient(volume.astype(np.float32))))


def score(model, source, affine, reference, *, window, grid_input, **options) -> dict[str, dict[str, float]]:
    """Calibration of each candidate map for one test (source → reference on the output grid)."""
    result = infer_volume(model, source, affine, consistency=True, **options)
    maps = {
        "cycle": result.consistency,
        "flips": flip_disagreement(model, source, affine, result.array, **options),
        "correction": np.abs(np.clip(result.array, *window) - np.clip(grid_input, *window)),
        "input gradient": _gradient(np.clip(grid_input, *window)),
    }
    rows = {name: calibration(m, result.array, reference, window=window) for name, m in maps.items()}
    rows["(output)"] = {
        "mae": float(np.abs(np.clip(result.array, *window) - np.clip(reference, *window)).mean())
    }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", nargs="?", default="all", choices=("sr", "kernel", "all"))
    parser.add_argument("--workdir", type=Path, required=True, help="the quality benchmark's --workdir")
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--kernel-y", default="0:512", help="y rows of the kernel test half (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    if args.experiment in ("sr", "all"):
        sr = load_model(args.workdir / "sr" / "run" / "checkpoints" / "last.pt", device="cpu")
        chest = load_volume(args.data / "ct_chest_1p5mm" / "chest_ct.nii.gz")
        _, slab = split_slab(*chest, fraction=0.7, multiple=FACTORS[2])
        tests = {
            "abdomen (3 mm)": load_volume(args.data / "ct_abdomen_3mm" / "abdomen_ct.nii.gz"),
            "chest slab": slab,
        }
        for name, (hu, affine) in tests.items():
            n = [s // f * f for s, f in zip(hu.shape, FACTORS, strict=True)]
            hr = hu[: n[0], : n[1], : n[2]]
            thick, thick_affine = thick_slice(hr, affine, FACTORS)
            upsampled, _ = upsample_to_hr(thick, thick_affine, FACTORS, mode=sr.upsample)
            results[f"sr {name}"] = score(sr, thick, thick_affine, hr, window=SR_WINDOW, grid_input=upsampled)
            print(f"sr {name}: {json.dumps(results[f'sr {name}'])}", file=sys.stderr, flush=True)
    if args.experiment in ("kernel", "all"):
        last = args.workdir / "kernel" / "philips" / "run" / "checkpoints" / "last.pt"
        kernel = load_model(last, device="cpu")
        pair = args.data / "ct_kernel_pair_philips_B_L"
        (smooth, affine), (sharp, _) = load_volume(pair / "B"), load_volume(pair / "L")
        y0, y1 = (int(v) for v in args.kernel_y.split(":"))
        smooth, sharp = smooth[:, y0:y1], sharp[:, y0:y1]
        affine = np.asarray(affine, dtype=np.float64).copy()
        affine[:3, 3] += y0 * affine[:3, 1]  # voxel (0, y0, 0) is the crop's origin
        half = smooth.shape[0] // 2
        test_affine = np.asarray(affine, dtype=np.float64).copy()
        test_affine[:3, 3] += half * test_affine[:3, 0]
        target = tuple(
            c if n <= c else c // 2 for c, n in zip(kernel.patch_size, smooth[half:].shape, strict=True)
        )
        b, l_ = smooth[half:], sharp[half:]
        for direction, label, source, reference in (("forward", "B->L", b, l_), ("inverse", "L->B", l_, b)):
            options = {"direction": direction, "target_size": target}
            results[f"kernel {label}"] = score(
                kernel, source, test_affine, reference, window=KERNEL_WINDOW, grid_input=source, **options
            )
            print(f"kernel {label}: {json.dumps(results[f'kernel {label}'])}", file=sys.stderr, flush=True)
    print(f"{'test':<24}{'map':<16}{'top5% MAE':>10}{'rest MAE':>10}{'ratio':>7}{'Spearman':>9}")
    for test, rows in results.items():
        for name, r in rows.items():
            if "ratio" in r:
                print(f"{test:<24}{name:<16}{r['top_mae']:>10.2f}{r['rest_mae']:>10.2f}{r['ratio']:>7.2f}"
                      f"{r['spearman']:>9.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
