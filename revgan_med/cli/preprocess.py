"""Turn a folder of scans into training pairs: per-case NIfTI, datalist.json and report.csv.

Finds every NIfTI file and DICOM series under INPUT_DIR (recursively) and writes OUTPUT_DIR/<case>/
image.nii.gz (network input), target.nii.gz (reference) [and mask.nii.gz for dMRI], then
OUTPUT_DIR/datalist.json (MONAI datalist, training/validation split, relative paths) and
OUTPUT_DIR/report.csv (case,source,status,message). Volumes stay in HU (or scanner units).

  ct-sr      target = the scan (cropped to a multiple of the factors), input = its thick-slice
             simulation (average of X·Y·Z voxel blocks) on its own low-resolution grid
  dmri-sr    the same on a 6-channel DTI volume: a DWI NIfTI with .bval/.bvec beside it or a DWI
             DICOM series (converted by dcm2niix) is fitted with dipy first, a brain mask is computed
  ct-kernel  pairs INPUT_DIR/<case>/source + INPUT_DIR/<case>/target (NIfTI file or DICOM folder,
             grids must coincide) or --pairs CSV (case,source,target; paths relative to the CSV);
             --simulate-kernel makes a SIMULATED smooth→sharp pair from each single scan

Finished cases are skipped (resumable; --overwrite redoes them; a case whose input changed is redone);
inputs are never modified and nothing is written outside OUTPUT_DIR; volumes with NaN/Inf voxels are
refused. A case that fails is named in report.csv and on stderr, and the others go on. --shard i/n
makes the i-th of n slices of the cases (job arrays; report.shard<i>of<n>.csv). Exit code 0: all
cases ok; 1: some failed; 2: usage error (also: no scan found).

Examples:
  revgan-med preprocess scans/ prep/ --task ct-sr --factors 2,2,4 --workers 4
  revgan-med preprocess pairs/ prep_kernel/ --task ct-kernel --window ct-full
  revgan-med preprocess scans/ prep_kernel/ --task ct-kernel --pairs pairs.csv
  revgan-med preprocess dwi/ prep_dti/ --task dmri-sr --factors 2,2,2
  revgan-med preprocess archive/ prep/ --task ct-sr --shard 3/16
"""

from __future__ import annotations

import argparse

from revgan_med.cli import add_tilt_argument
from revgan_med.tasks import DEFAULT_FACTORS, DEFAULT_WINDOW, TASKS, WINDOWS, parse_factors

HELP = "make per-case training pairs, datalist.json and report.csv from a folder of scans"
ORDER = 10


def _factors(text: str) -> list[int]:
    try:
        return list(parse_factors(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="folder of NIfTI files / DICOM series")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="where cases, datalist.json, report.csv go")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument(
        "--window",
        help=f"HU window the model will use: {', '.join(WINDOWS)} or MIN,MAX; recorded in the datalist "
        f"and checked by train (default: open, the config decides; {DEFAULT_WINDOW} when it does not)",
    )
    factors = ",".join(map(str, DEFAULT_FACTORS))
    parser.add_argument(
        "--factors", type=_factors, default=list(DEFAULT_FACTORS),
        help=f"X,Y,Z degradation (default {factors})",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already done")
    parser.add_argument("--pairs", metavar="CSV", help="ct-kernel: CSV with case,source,target")
    parser.add_argument(
        "--simulate-kernel", action="store_true", help="ct-kernel: simulate a smooth/sharp pair per scan"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.2,
        help="validation share of the cases, 0 (all train) to below 1 (default 0.2)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the training/validation split")
    parser.add_argument(
        "--shard", default="0/1", help="make the i-th of n slices of the cases (default: 0/1)"
    )
    add_tilt_argument(parser)


def run(args: argparse.Namespace) -> int:
    import sys

    from revgan_med.config import ConfigError
    from revgan_med.sharding import parse_shard

    try:
        shard = parse_shard(args.shard)
    except ValueError as exc:
        raise ConfigError(f"--shard: {exc}") from None

    from revgan_med.data.preprocess import preprocess

    report = preprocess(
        args.input_dir,
        args.output_dir,
        task=args.task,
        window=args.window,
        factors=args.factors,
        workers=args.workers,
        overwrite=args.overwrite,
        pairs_csv=args.pairs,
        val_fraction=args.val_fraction,
        seed=args.seed,
        simulate_kernel=args.simulate_kernel,
        shard=shard,
        tilt=args.tilt,
    )
    counts = ", ".join(f"{report.count(s)} {s}" for s in ("ok", "skipped", "failed"))
    print(f"{counts}; report: {report.report_path}; datalist: {report.datalist_path}")
    for row in report.rows:
        if row.status == "failed":
            print(f"failed: {row.case}: {row.message}", file=sys.stderr)
    return report.exit_code
