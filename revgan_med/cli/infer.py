"""Translate scans with a trained checkpoint: super-resolution or kernel conversion, in both directions.

Everything about the model (task, window, factors, architecture, training patch) comes from the
checkpoint. INPUT is a NIfTI file, a DICOM series folder, or a folder of them (then OUTPUT and
--consistency-map are folders: OUTPUT/<case>.nii.gz). Super-resolution input is the scan as acquired
(thick slices); the output is on the HR grid implied by the checkpoint's factors, in HU. Each target
window is predicted from a context window centred on it (default: the training patch size). Outputs
are written atomically, never over the input, and labelled as derived: GAN outputs can invent or
remove structures — not for diagnosis.

Examples:
  revgan-med infer --checkpoint runs/ct_sr/checkpoints/best.pt --input thick.nii.gz --output sr.nii.gz
  revgan-med infer --checkpoint best.pt --input dicom/series1 --output sr_series --output-format dicom
  revgan-med infer --checkpoint best.pt --input sharp.nii.gz --output smooth.nii.gz --direction inverse \\
      --consistency-map cycle_error.nii.gz
  revgan-med infer --checkpoint best.pt --input scans/ --output out/ --shard 0/4 --device cuda --amp
"""

from __future__ import annotations

import argparse

HELP = "translate scans (NIfTI / DICOM / folders) with a trained checkpoint"
ORDER = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (RUN_DIR/checkpoints/best.pt)")
    parser.add_argument("--input", required=True, help="NIfTI file, DICOM series folder, or folder of inputs")
    parser.add_argument(
        "--output", required=True, help="output NIfTI file / DICOM folder, or folder for folders"
    )
    parser.add_argument(
        "--direction",
        default="forward",
        choices=("forward", "inverse"),
        help="forward: X→Y (LR→HR, source→target kernel); inverse: Y→X (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument(
        "--target-size",
        type=int,
        default=None,
        help="target window edge (default: checkpoint infer.target_size)",
    )
    parser.add_argument(
        "--context-size", type=int, default=None, help="context window edge (default: training patch size)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward pass (default: checkpoint infer.batch_size)",
    )
    parser.add_argument(
        "--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)"
    )
    parser.add_argument("--output-format", default="nifti", choices=("nifti", "dicom"), help="default: nifti")
    parser.add_argument(
        "--consistency-map", help="write |G(F(x)) - x| per voxel (NIfTI) and print its summary"
    )
    parser.add_argument(
        "--shard", default="0/1", help="process the i-th of n slices of a folder (default: 0/1)"
    )
    parser.add_argument(
        "--tilt", default="correct", choices=("correct", "refuse"),
        help="gantry-tilted CT: resample onto an orthogonal grid (default) or refuse the series",
    )  # fmt: skip
    parser.add_argument(
        "--keep-out-of-window",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="voxels outside the training window keep the input's value (default: on)",
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from revgan_med.config import ConfigError
    from revgan_med.inference import infer_inputs, load_model, parse_shard

    try:
        shard = parse_shard(args.shard)
    except ValueError as exc:
        raise ConfigError(f"--shard: {exc}") from None  # a usage error: exit 2
    model = load_model(args.checkpoint, device=args.device)
    report = infer_inputs(
        model,
        args.input,
        args.output,
        shard=shard,
        output_format=args.output_format,
        consistency_map=args.consistency_map,
        direction=args.direction,
        target_size=args.target_size,
        context_size=args.context_size,
        batch_size=args.batch_size,
        amp=args.amp,
        keep_out_of_window=args.keep_out_of_window,
        tilt=args.tilt,
    )
    for source, output, summary in report.done:
        line = f"{source} -> {output}"
        if summary is not None:
            line += "  |G(F(x))-x|: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items())
        print(line)
    for source, message in report.failed:
        print(f"FAILED {source}: {message}", file=sys.stderr)
    print(f"{len(report.done)} written, {len(report.failed)} failed")
    return 1 if report.failed else 0
