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

Finished cases are skipped (resumable; --overwrite redoes them); inputs are never modified; a case
that fails is named in report.csv and the others go on. Exit code 0: all cases ok; 1: some failed;
2: usage error.

Examples:
  revgan-med preprocess scans/ prep/ --task ct-sr --factors 2,2,4 --workers 4
  revgan-med preprocess pairs/ prep_kernel/ --task ct-kernel --window ct-full
  revgan-med preprocess scans/ prep_kernel/ --task ct-kernel --pairs pairs.csv
  revgan-med preprocess dwi/ prep_dti/ --task dmri-sr --factors 2,2,2
"""

from __future__ import annotations

import argparse

HELP = "make per-case training pairs, datalist.json and report.csv from a folder of scans"
ORDER = 10


def _factors(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three positive integers X,Y,Z")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="folder of NIfTI files / DICOM series")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="where cases, datalist.json, report.csv go")
    parser.add_argument("--task", required=True, choices=("ct-sr", "ct-kernel", "dmri-sr"))
    parser.add_argument(
        "--window", default="chest-1024", help="HU window: chest-1024, nlst, ct-full or MIN,MAX"
    )
    parser.add_argument(
        "--factors", type=_factors, default=[2, 2, 4], help="X,Y,Z degradation (default 2,2,4)"
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already done")
    parser.add_argument("--pairs", metavar="CSV", help="ct-kernel: CSV with case,source,target")
    parser.add_argument(
        "--simulate-kernel", action="store_true", help="ct-kernel: simulate a smooth/sharp pair per scan"
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training/validation split")
    parser.add_argument(
        "--tilt", default="correct", choices=("correct", "refuse"),
        help="gantry-tilted CT: resample onto an orthogonal grid (default) or refuse the series",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
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
        tilt=args.tilt,
    )
    counts = ", ".join(f"{report.count(s)} {s}" for s in ("ok", "skipped", "failed"))
    print(f"{counts}; report: {report.report_path}; datalist: {report.datalist_path}")
    for row in report.rows:
        if row.status == "failed":
            print(f"failed: {row.case}: {row.message}")
    return report.exit_code
