"""Translate scans with a trained checkpoint: super-resolution or kernel conversion, in both directions.

Everything about the model (task, window, factors, architecture, training patch) comes from the
checkpoint (or exported model file). INPUT is a NIfTI file, a DICOM series folder, or a folder of
them (then OUTPUT and --error-map are folders: OUTPUT/<case>.nii.gz). Super-resolution input is the
scan as acquired (thick slices); the output is on the HR grid implied by the checkpoint's factors, in
HU. Each target window is predicted from a context window centred on it (default: the training patch
size). Outputs are written atomically, never over the input, and labelled as derived: GAN outputs can
invent or remove structures — not for diagnosis. Scans with NaN/Inf voxels and 2D images are refused
(one line each; a folder run goes on with the others).

Examples:
  revgan-med infer --checkpoint runs/ct_sr/checkpoints/best.pt --input thick.nii.gz --output sr.nii.gz
  revgan-med infer --checkpoint best.pt --input dicom/series1 --output sr_series --output-format dicom
  revgan-med infer --checkpoint best.pt --input sharp.nii.gz --output smooth.nii.gz --direction inverse \\
      --error-map error_map.nii.gz
  revgan-med infer --checkpoint best.pt --input scans/ --output out/ --shard 0/4 --device cuda --amp
"""

from __future__ import annotations

import argparse

from revgan_med.cli import add_tilt_argument

HELP = "translate scans (NIfTI / DICOM / folders) with a trained checkpoint"
ORDER = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (RUN_DIR/checkpoints/best.pt)")
    parser.add_argument(
        "-i", "--input", required=True, help="NIfTI file, DICOM series folder, or folder of inputs"
    )
    parser.add_argument(
        "-o", "--output", required=True, help="output NIfTI file / DICOM folder, or folder for folders"
    )
    parser.add_argument(
        "--direction",
        default="forward",
        choices=("forward", "inverse"),
        help="forward: X→Y (LR→HR, source→target kernel); inverse: Y→X (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto: a GPU if there is one)"
    )
    parser.add_argument(
        "--target-size", type=_edges, default=None, metavar="T|X,Y,Z",
        help="target window, one edge or per axis, e.g. 64,64,8 (default: the checkpoint's infer.target_size;"
        " none: windows as large as fit, about one pass of the network)",
    )  # fmt: skip
    parser.add_argument(
        "--context-size", type=_edges, default=None, metavar="C|X,Y,Z",
        help="context window, one edge or per axis (default: the training patch with --target-size, else the"
        " target plus the network's receptive radius on each side)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward pass (default: checkpoint infer.batch_size)",
    )
    parser.add_argument(
        "--amp", action="store_true",
        help="mixed precision for the learned body (bfloat16 on CPU and Ampere+ GPUs, else float16)",
    )  # fmt: skip
    parser.add_argument("--output-format", default="nifti", choices=("nifti", "dicom"), help="default: nifti")
    parser.add_argument(
        "--error-map", metavar="PATH",
        help="write a per-voxel reliability map (NIfTI, output units): the spread of the outputs for the "
        "input mirrored along each axis and x/y swapped; 4-5x the inference time (see README, Error map)",
    )  # fmt: skip
    parser.add_argument(
        "--ensemble", action=argparse.BooleanOptionalAction, default=None,
        help="write the mean of the outputs for the input as given, mirrored along each axis and x/y "
        "swapped (geometric self-ensemble; 4-5x the inference time; see README). Default: the "
        "checkpoint's infer.ensemble (on for configs/ct_kernel_paired.yaml)",
    )  # fmt: skip
    parser.add_argument(
        "--consistency-map", help="write |G(F(x)) - x| per voxel (NIfTI) and print its summary"
    )
    parser.add_argument(
        "--shard", default="0/1", help="process the i-th of n slices of a folder (default: 0/1)"
    )
    add_tilt_argument(parser)
    parser.add_argument(
        "--keep-out-of-window",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="voxels outside the training window keep the input's value (default: on)",
    )


def _edges(text: str) -> int | list[int]:
    """``64`` or ``64,64,8`` → a window edge for all axes or one per axis."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or X,Y,Z positive integers") from None
    if len(values) not in (1, 3) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or X,Y,Z positive integers")
    return values[0] if len(values) == 1 else values


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from revgan_med.config import ConfigError
    from revgan_med.io.checks import check_output_location
    from revgan_med.sharding import parse_shard

    try:
        shard = parse_shard(args.shard)
    except ValueError as exc:
        raise ConfigError(f"--shard: {exc}") from None  # a usage error: exit 2
    if args.error_map and args.consistency_map:
        raise ConfigError("--error-map and --consistency-map: choose one map")
    if not Path(args.input).exists():
        raise ValueError(f"{args.input}: no such file or folder")
    for path in (args.output, args.error_map, args.consistency_map):
        if path is not None:
            check_output_location(path)  # before seconds of imports and minutes of inference

    from revgan_med.inference import load_model
    from revgan_med.inference_files import infer_inputs

    model = load_model(args.checkpoint, device=args.device)
    if model.ensemble and args.ensemble is None:  # on by the checkpoint: say so, and the cost
        print("flip ensemble on (the checkpoint's infer.ensemble; --no-ensemble: one pass, 4-5x faster)",
              file=sys.stderr)  # fmt: skip
    report = infer_inputs(
        model,
        args.input,
        args.output,
        shard=shard,
        output_format=args.output_format,
        consistency_map=args.error_map or args.consistency_map,
        map_kind="flips" if args.error_map else "cycle",
        direction=args.direction,
        target_size=args.target_size,
        context_size=args.context_size,
        batch_size=args.batch_size,
        amp=args.amp,
        keep_out_of_window=args.keep_out_of_window,
        tilt=args.tilt,
        ensemble=args.ensemble,  # None: the checkpoint's infer.ensemble (`infer_path`)
    )
    for source, output, summary in report.done:
        line = f"{source} -> {output}"
        if summary is not None:
            line += ("  error map: " if args.error_map else "  |G(F(x))-x|: ") + ", ".join(
                f"{k} {v:.4g}" for k, v in summary.items()
            )
        print(line)
    for source, message in report.failed:
        print(f"FAILED {source}: {message}", file=sys.stderr)
    print(f"{len(report.done)} written, {len(report.failed)} failed")
    return 1 if report.failed else 0
