"""Train a RevGAN (or a baseline) from a YAML config.

Reads the config strictly (unknown keys and wrong types are errors naming the key), applies
`--set` overrides, writes the fully resolved config to RUN_DIR/config.yaml and trains, writing
RUN_DIR/metrics.csv, TensorBoard events in RUN_DIR/tensorboard and RUN_DIR/checkpoints/{last,best}.pt,
and ends with the last validation's model vs baseline (tricubic for super-resolution, the fitted linear
filter for kernel conversion, in both directions) and a WARNING line for each direction in which the model
is below it; best.pt has the largest margin (kernels: the mean of the two). A datalist with one training
case and no validation case is split: its last slices validate.
`--resume` continues from RUN_DIR/checkpoints/last.pt exactly where it stopped (also after a kill);
without --config it reuses RUN_DIR/config.yaml. For several GPUs or nodes, launch with torchrun.

Examples:
  revgan-med train --config configs/ct_sr_paired.yaml --output runs/ct_sr
  revgan-med train --config configs/demo.yaml --set train.steps=50 --set model.width=4 --output /tmp/run
  revgan-med train --output runs/ct_sr --resume
  revgan-med train --output runs/ct_sr --resume --set train.steps=40000
  torchrun --nproc_per_node=4 -m revgan_med train --config configs/ct_sr_paired.yaml --output runs/ct_sr
"""

from __future__ import annotations

import argparse

HELP = "train a model from a YAML config (resumable; multi-GPU with torchrun)"
ORDER = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default with --resume: RUN_DIR/config.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config key (YAML value), e.g. --set data.patch_size=[32,32,32]; repeatable",
    )
    parser.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from revgan_med.config import ConfigError, load_config

    config_path = args.config
    if config_path is None:
        if not args.resume:
            raise ConfigError("--config is required (it may be left out only with --resume)")
        config_path = Path(args.output) / "config.yaml"
    config = load_config(config_path, args.overrides)

    from revgan_med.io.checks import check_output_location

    check_output_location(Path(args.output) / "config.yaml")  # before seconds of imports

    from revgan_med.training.loop import train
    from revgan_med.training.validation import baseline_name, margin_report

    last = train(config, args.output, resume=args.resume)
    print(f"checkpoint: {last}")
    for line in margin_report(args.output, baseline_name(config)):
        print(line)
    return 0
