"""Compare predictions with references: MAE, RMSE, PSNR, SSIM (3D), and what no model would give.

P and R are files, or folders whose scans are matched by case name (as `revgan-med infer` names
them). CT metrics are computed in the stated window (HU clipped to it, PSNR/SSIM data range = its
width); for dMRI (--task dmri-sr) there is no window and --mask adds RMSE in the mask and in its
interior (mask eroded by 5³). Baselines are computed from the same thick-slice input (--input):
identity (nearest / unchanged), trilinear and tricubic centre-aligned upsampling to the HR grid.
Prints per-case rows plus mean and std; --output writes them as CSV, --figure a PNG of coronal and
axial slices. With --checkpoint (the model that made the predictions) task, window and factors default
to the ones it was trained with. A case whose volumes hold NaN/Inf voxels fails (the mean covers the
valid cases). Exit 0 when every case was evaluated, 1 when some failed, 2 on usage errors.

Examples:
  revgan-med evaluate --prediction sr.nii.gz --reference hr.nii.gz --input thick.nii.gz \\
      --baseline trilinear,tricubic --figure sr.png
  revgan-med evaluate --prediction out/ --reference cases/hr/ --window nlst --output metrics.csv
  revgan-med evaluate --checkpoint run/checkpoints/best.pt --prediction out/ --reference cases/hr/
  revgan-med evaluate --prediction smooth.nii.gz --reference smooth_ref.nii.gz --window nlst \\
      --error-map error_map.nii.gz
  revgan-med evaluate --prediction dti_sr.nii.gz --reference dti.nii.gz --mask brain.nii.gz --task dmri-sr
  revgan-med evaluate --sensitivity run/checkpoints/best.pt --input smooth.nii.gz --reference sharp.nii.gz \\
      --prediction smooth_from_other_model.nii.gz --window nlst
"""

from __future__ import annotations

import argparse

from revgan_med.tasks import DEFAULT_WINDOW, TASKS

HELP = "metrics (MAE/PSNR/SSIM, masked RMSE) vs references and interpolation baselines"
ORDER = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prediction", required=True, help="predicted volume, or folder of them")
    parser.add_argument(
        "--reference", required=True, help="reference volume, or folder (matched by case name)"
    )
    parser.add_argument(
        "-i", "--input", help="the model's input (thick-slice scan), for baselines and figures"
    )
    parser.add_argument("--mask", help="mask volume (or folder): metrics inside it, plus interior RMSE")
    parser.add_argument(
        "--window",
        help=f"NAME or MIN,MAX in HU (default: the --checkpoint's window, else {DEFAULT_WINDOW} for CT, "
        "none for dmri-sr)",
    )
    parser.add_argument(
        "--checkpoint", metavar="CKPT",
        help="the model that made the predictions: task, window and factors default to its own",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", default="", help="comma list of identity,trilinear,tricubic (needs --input)"
    )
    parser.add_argument("-o", "--output", help="CSV file for per-case rows plus mean and std")
    parser.add_argument("--figure", help="PNG of coronal and axial slices (one per case for folders)")
    parser.add_argument("--task", choices=TASKS, help="default: the --checkpoint's task, else ct-sr")
    parser.add_argument(
        "--factors",
        help="X,Y,Z super-resolution factors (default: the --checkpoint's, else reference shape // "
        "input shape)",
    )
    parser.add_argument(
        "--sensitivity", metavar="CKPT",
        help="model-sensitivity analysis (self-inverse paper §6) of CKPT: --input is x, --reference its "
        "paired y, --prediction the perturbed input x + dx; prints |dPSNR|, |dSSIM|, |dMAE|, output change",
    )  # fmt: skip
    parser.add_argument(
        "--error-map", metavar="MAP",
        help="error map (file or folder, as infer --error-map writes): how well it predicts |prediction - "
        "reference| in the window (mean error in the top 5 %% flagged voxels vs the rest, Spearman "
        "over 8^3 blocks)",
    )  # fmt: skip
    parser.add_argument("--direction", default="forward", choices=("forward", "inverse"),
                        help="model direction for --sensitivity (default: forward)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import sys

    from revgan_med.config import ConfigError
    from revgan_med.tasks import evaluation_window, parse_factors

    if args.sensitivity:
        return _sensitivity(args)
    baselines = [b.strip() for b in args.baseline.split(",") if b.strip()]
    if baselines and args.input is None:
        raise ConfigError("--baseline needs --input (the scan the baselines upsample)")
    factors = None
    if args.factors:  # checked before the heavy imports below
        try:
            factors = parse_factors(args.factors)
        except ValueError as exc:
            raise ConfigError(f"--factors: {exc}") from None
    spec = None
    if args.checkpoint:
        from revgan_med.checkpoints import checkpoint_spec, load_checkpoint

        spec = checkpoint_spec(load_checkpoint(args.checkpoint))
    task = args.task or (spec.task if spec else "ct-sr")
    if factors is None and spec is not None:
        factors = spec.factors
    try:
        window = evaluation_window(task, args.window, spec.window if spec else None)
    except ValueError as exc:
        raise ConfigError(f"--window: {exc}") from None

    from revgan_med.evaluation import evaluate_volumes, format_table

    report = evaluate_volumes(
        args.prediction,
        args.reference,
        input=args.input,
        mask=args.mask,
        window=window,
        baselines=baselines,
        factors=factors,
        output=args.output,
        figure=args.figure,
    )
    if report.rows:
        print(f"window: {'none' if window is None else '{:g},{:g}'.format(*window)}")
        print(format_table(report.rows + report.summary))
    if args.error_map:
        report.failed += _calibration(args, window)
    for name, message in report.failed:
        print(f"FAILED {name}: {message}", file=sys.stderr)
    if not report.rows:
        print("no case could be evaluated", file=sys.stderr)
    return 1 if report.failed or not report.rows else 0


def _calibration(args: argparse.Namespace, window: str | None) -> list[tuple[str, str]]:
    """Print the error map's calibration per case; returns the cases that failed."""
    from revgan_med.data.transforms import parse_window
    from revgan_med.errormap import calibrate_files

    rows, failed = calibrate_files(
        args.error_map,
        args.prediction,
        args.reference,
        window=None if window is None else parse_window(window),
    )
    if rows:
        print("error map calibration (|error| in the window):")
        print(f"{'case':<24}{'top 5% MAE':>11}{'rest MAE':>10}{'ratio':>7}{'Spearman 8^3':>13}")
    for r in rows:
        print(
            f"{r['case']:<24}{r['top_mae']:>11.3f}{r['rest_mae']:>10.3f}{r['ratio']:>7.2f}{r['spearman']:>13.3f}"
        )
    return [(name, f"error map: {message}") for name, message in failed]


def _sensitivity(args: argparse.Namespace) -> int:
    from revgan_med.config import ConfigError
    from revgan_med.sensitivity import SENSITIVITY_COLUMNS, sensitivity_from_files

    if args.input is None:
        raise ConfigError("--sensitivity needs --input (x), --reference (y) and --prediction (x + dx)")
    row = sensitivity_from_files(
        args.sensitivity, source=args.input, reference=args.reference, perturbed=args.prediction,
        direction=args.direction, window=args.window,
    )  # fmt: skip
    print(" | ".join(SENSITIVITY_COLUMNS))
    cells = (row[k] if isinstance(row[k], str) else f"{row[k]:.4g}" for k in SENSITIVITY_COLUMNS)
    print(" | ".join(cells))
    return 0
