"""Export a trained model as one artefact to hand on: a model file, a MONAI bundle, or TorchScript.

``model`` writes one weights-only file (generator weights, experiment spec, model card) that `infer`
and `evaluate --sensitivity` read like a checkpoint, at a fraction of its size, plus the card as
Markdown beside it (``<name>.card.md``). ``bundle`` writes a MONAI bundle folder (configs/metadata.json,
configs/inference.json, models/model.pt, docs/README.md) runnable with ``python -m monai.bundle run``.
``torchscript`` writes forward and inverse in network units for plain PyTorch (the caller windows and
tiles; see README). The card reads the training datalist, when still there, for case count, voxel
spacings and scanner vendors/kernels, and scores the model on its validation cases.

Examples:
  revgan-med export --checkpoint runs/ct_sr/checkpoints/best.pt --output ct_sr.pt --licence CC-BY-4.0
  revgan-med export --checkpoint runs/ct_sr/checkpoints/best.pt --output ct_sr_bundle --format bundle
  revgan-med export --checkpoint ct_sr.pt --output ct_sr.ts --format torchscript
"""

from __future__ import annotations

import argparse

HELP = "export a trained model: one model file with its card, a MONAI bundle, or TorchScript"
ORDER = 35
FORMATS = ("model", "bundle", "torchscript")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint (or exported model file) to export")
    parser.add_argument("-o", "--output", required=True, help="output file (model, torchscript) or folder")
    parser.add_argument("--format", default="model", choices=FORMATS, help="default: model")
    parser.add_argument("--licence", help="licence of the weights, written into the model card")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from revgan_med.export import card_path, export_model, export_torchscript

    if Path(args.output).resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"{args.output}: refusing to write over the checkpoint")
    if args.format == "model":
        out = export_model(args.checkpoint, args.output, licence=args.licence)
        print(f"{out} ({out.stat().st_size / 1e6:.2f} MB), card: {card_path(out)}")
    elif args.format == "torchscript":
        out = export_torchscript(args.checkpoint, args.output)
        print(f"{out} ({out.stat().st_size / 1e6:.2f} MB)")
    else:
        from revgan_med.bundle import export_bundle

        out = export_bundle(args.checkpoint, args.output, licence=args.licence)
        print(f"{out}: MONAI bundle (python -m monai.bundle run --config_file {out}/configs/inference.json)")
    return 0
