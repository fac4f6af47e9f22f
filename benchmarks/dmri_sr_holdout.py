"""Held-out DTI super-resolution (x2) on one DWI scan: train on one half of the brain, test on the other.

The DWI (NIfTI with .bval/.bvec, or a DICOM series folder) is preprocessed as `preprocess --task dmri-sr
--factors 2,2,2` does, then cut at the middle of x (left/right); each direction trains
`configs/dmri_sr_paired.yaml` (plus `--set` overrides) on one half and reports, on the other half, the
RMSE inside the brain mask and inside its 5³-eroded interior for the model (last checkpoint: the held-out
half is never looked at during training), trilinear and tricubic interpolation.

Example (the numbers in README's status section):
  OMP_NUM_THREADS=2 python benchmarks/dmri_sr_holdout.py DWI.nii.gz holdout/ --steps 300 \\
      --set model.width=16
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dmri_sr_paired.yaml"


def _halves(case: Path, out: Path) -> dict[str, dict[str, str]]:
    """Left/right halves (along x) of a preprocessed case; LR and HR cut at the same world plane."""
    from revgan_med.io import load_volume, save_volume

    halves: dict[str, dict[str, str]] = {}
    for key in ("image", "target", "mask"):
        array, affine = load_volume(case / f"{key}.nii.gz")
        mid = array.shape[0] // 2
        for name, start in (("left", 0), ("right", mid)):
            shift = np.eye(4)
            shift[0, 3] = start
            path = out / name / f"{key}.nii.gz"
            save_volume(array[start : start + mid], affine @ shift, path)
            halves.setdefault(name, {})[key] = str(path)
    return halves


def run_direction(train_half: dict, test_half: dict, run: Path, steps: int, overrides: list[str]) -> dict:
    from revgan_med.config import load_config
    from revgan_med.evaluation import Case, evaluate_case
    from revgan_med.inference import load_model
    from revgan_med.inference_files import infer_path
    from revgan_med.training.loop import train

    run.mkdir(parents=True, exist_ok=True)
    datalist = run / "datalist.json"
    datalist.write_text(json.dumps({"training": [train_half], "validation": [train_half]}))
    settings = [f"data.datalist={datalist}", f"train.steps={steps}", f"train.decay_start={steps // 2}",
                f"train.val_every={steps}", f"train.checkpoint_every={steps}", "data.num_workers=0",
                "train.device=cpu", *overrides]  # fmt: skip
    config = load_config(CONFIG, settings)
    start = time.perf_counter()
    last = train(config, run / "train")
    seconds = time.perf_counter() - start
    prediction = run / "prediction.nii.gz"
    infer_path(load_model(last, device="cpu"), test_half["image"], prediction)
    case = Case("held-out", prediction, Path(test_half["target"]), Path(test_half["image"]),
                Path(test_half["mask"]))  # fmt: skip
    rows, _, _ = evaluate_case(case, window=None, baselines=("trilinear", "tricubic"))
    result = {r["method"]: {"rmse": r["rmse"], "rmse_interior": r["rmse_interior"]} for r in rows}
    return {"train_seconds": round(seconds, 1), "steps": steps, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dwi", type=Path, help="DWI NIfTI (with .bval/.bvec beside it) or DICOM series folder"
    )
    parser.add_argument("output", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", action="append", default=[], help="config override key.path=value")
    parser.add_argument("--train-half", choices=("left", "right"), action="append",
                        help="train on this half only (default: both directions)")  # fmt: skip
    args = parser.parse_args()
    from revgan_med.data.preprocess import preprocess
    from revgan_med.io.dwi import gradient_files

    scans = args.output / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    link = scans / (args.dwi.name if args.dwi.is_dir() else "dwi" + "".join(args.dwi.suffixes[-2:]))
    if not link.exists():
        link.symlink_to(args.dwi.resolve())
        if not args.dwi.is_dir():
            for src, dst in zip(gradient_files(args.dwi), gradient_files(link), strict=True):
                shutil.copy(src, dst)
    report = preprocess(scans, args.output / "prep", task="dmri-sr", factors=(2, 2, 2), progress=False)
    case = args.output / "prep" / report.rows[0].case
    halves = _halves(case, args.output / "halves")
    results = {}
    for train_name, test_name in (("left", "right"), ("right", "left")):
        if args.train_half and train_name not in args.train_half:
            continue
        run = args.output / f"train_{train_name}"
        results[f"train {train_name} -> test {test_name}"] = run_direction(
            halves[train_name], halves[test_name], run, args.steps, args.set
        )
    for name, result in results.items():
        model, lin, cub = (result[m]["rmse_interior"] for m in ("prediction", "trilinear", "tricubic"))
        print(f"{name}: {result['steps']} steps in {result['train_seconds']} s; interior RMSE model "
              f"{model:.4g}, trilinear {lin:.4g} ({model / lin - 1:+.1%}), tricubic {cub:.4g} "
              f"({model / cub - 1:+.1%})")  # fmt: skip
    name = "_".join(args.train_half or ["both"])
    (args.output / f"results_{name}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
