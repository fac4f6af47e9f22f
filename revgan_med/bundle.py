"""Export as a MONAI bundle: a folder that MONAI's own ``ConfigParser`` / ``monai.bundle run`` executes.

``configs/inference.json`` describes the generator (``network_def``, built by
`revgan_med.networks.build_generator` from plain arguments), loads ``models/model.pt`` (a plain state
dict) into it (``network``) and runs ``pipeline``: the same windowing, upsampling, sliding-window
tiling and file writing as ``revgan-med infer``. Run it with::

    python -m monai.bundle run --config_file B/configs/inference.json --bundle_root B \\
        --input_path scan.nii.gz --output_path out.nii.gz [--direction inverse]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import monai
import torch

from revgan_med.checkpoints import Model, checkpoint_config, checkpoint_spec
from revgan_med.export import card_markdown, exported_payload
from revgan_med.inference_files import infer_path
from revgan_med.io.atomic import atomic_path, atomic_write_text
from revgan_med.networks.selfinverse import SelfInverseGenerator
from revgan_med.tasks import TASK_CHANNELS
from revgan_med.tiling import DEFAULT_MARGIN


def load_network(
    network: torch.nn.Module, weights: str | Path, device: str | torch.device
) -> torch.nn.Module:
    """`network` with the state dict in `weights` (``weights_only``), on `device`, in eval mode."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.to(device).eval()


def self_inverse(network: torch.nn.Module) -> torch.nn.Module:
    """The self-inverse wrapper (one function f = f⁻¹) that self-inverse models are trained with."""
    return SelfInverseGenerator.from_generator(network)


class BundlePipeline:
    """``pipeline(input_path, output_path)``: `revgan_med.inference_files.infer_path`, bundle network.

    `spec` holds what `revgan_med.checkpoints.Model` needs besides the network (task, intensity,
    patch_size, factors, upsample, target_size, context_size, batch_size, ensemble, name); the margin around
    each target window is the network's receptive radius, as in ``revgan-med infer``.
    """

    def __init__(self, network: torch.nn.Module, spec: dict[str, Any], *, device: str | torch.device,
                 direction: str = "forward") -> None:  # fmt: skip
        radius = getattr(network, "receptive_radius", None)
        self.direction = direction
        self.model = Model(
            generator=network, task=spec["task"], intensity=dict(spec["intensity"]),
            patch_size=tuple(spec["patch_size"]), factors=tuple(spec["factors"]), upsample=spec["upsample"],
            target_size=spec["target_size"], context_size=spec.get("context_size"),
            margin=radius() if radius is not None else DEFAULT_MARGIN, batch_size=spec["batch_size"],
            ensemble=spec.get("ensemble", False), name=spec["name"], device=torch.device(device),
        )  # fmt: skip

    def __call__(self, input_path: str | Path, output_path: str | Path) -> Path:
        if not input_path or not output_path:
            raise ValueError(
                "set input_path and output_path (e.g. --input_path scan.nii.gz --output_path out.nii.gz)"
            )
        infer_path(self.model, input_path, output_path, direction=self.direction)
        return Path(output_path)


def inference_config(payload: dict[str, Any]) -> dict[str, Any]:
    """The ``configs/inference.json`` content for an exported model payload."""
    config, task_spec = checkpoint_config(payload), checkpoint_spec(payload)
    m, channels = config.model, TASK_CHANNELS[config.task]
    network_def: dict[str, Any] = {
        "_target_": "revgan_med.networks.build_generator", "name": m.generator, "in_channels": channels,
        "out_channels": channels, "width": m.width, "depth": m.depth, "memory_saving": False,
        "residual": m.residual, "linear_kernel": m.linear_kernel,
    }  # fmt: skip
    wrapped = "self_inverse(@network_def)" if config.objective == "self-inverse" else "@network_def"
    spec = {
        "task": task_spec.task, "intensity": dict(payload["intensity"]),
        "patch_size": list(task_spec.patch_size), "factors": list(task_spec.factors),
        "upsample": task_spec.upsample, "target_size": config.infer.target_size,
        "context_size": config.infer.context_size, "batch_size": config.infer.batch_size,
        "ensemble": config.infer.ensemble, "name": f"{m.generator} {task_spec.task}",
    }  # fmt: skip
    return {
        "imports": [
            "$import torch",
            "$from revgan_med.bundle import load_network",
            "$from revgan_med.bundle import self_inverse",
        ],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "input_path": "",
        "output_path": "",
        "direction": "forward",
        "network_def": network_def,
        "network": f"$load_network({wrapped}, @bundle_root + '/models/model.pt', @device)",
        "spec": spec,
        "pipeline": {
            "_target_": "revgan_med.bundle.BundlePipeline",
            "network": "@network",
            "spec": "@spec",
            "device": "@device",
            "direction": "@direction",
        },  # fmt: skip
        "run": ["$@pipeline(@input_path, @output_path)"],
    }


def metadata(payload: dict[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's bundle metadata fields filled from the model card."""
    import numpy as np

    card = payload["card"]
    channels = TASK_CHANNELS[card["task"]]
    units = "HU" if card["task"].startswith("ct") else "diffusion tensor (scanner units)"
    image = {"type": "image", "format": units, "num_channels": channels, "spatial_shape": ["*", "*", "*"],
             "dtype": "float32", "value_range": [], "is_patch_data": False}  # fmt: skip
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": card["versions"]["revgan_med"],
        "monai_version": monai.__version__,
        "pytorch_version": str(torch.__version__).split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"revgan-med": card["versions"]["revgan_med"]},
        "task": card["task"],
        "description": f"{card['name']} ({card['objective']}); forward X→Y, inverse Y→X with --direction",
        "authors": "see docs/README.md",
        "copyright": "see license",
        "license": card["licence"],
        "intended_use": card["intended_use"],
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": dict(image)}},
        "model_card": card,
    }


def export_bundle(checkpoint: str | Path, output: str | Path, *, licence: str | None = None) -> Path:
    """Write the MONAI bundle folder `output` for `checkpoint` (an existing non-empty folder is refused)."""
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; choose a new bundle folder")
    payload = exported_payload(checkpoint, licence=licence)
    (out / "models").mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "models" / "model.pt") as tmp:
        torch.save(payload["models"]["generator"], tmp)
    atomic_write_text(
        out / "configs" / "inference.json", json.dumps(inference_config(payload), indent=2) + "\n"
    )
    atomic_write_text(out / "configs" / "metadata.json", json.dumps(metadata(payload), indent=2) + "\n")
    usage = (
        "\n## Running\n\n```\npython -m monai.bundle run --config_file configs/inference.json "
        "--bundle_root . --input_path scan.nii.gz --output_path out.nii.gz [--direction inverse]\n```\n"
    )
    atomic_write_text(out / "docs" / "README.md", card_markdown(payload["card"]) + usage)
    return out
