"""Self-describing checkpoints: one file that `infer` needs and nothing else.

A checkpoint is a plain dict of tensors and plain data (loadable with ``weights_only=True``):

- ``format`` / ``format_version`` / ``package_version``
- ``config``: the fully resolved `Config` as nested plain data (task, objective, model, window, ...)
- ``intensity``: the intensity mapping as plain data (`revgan_med.data.transforms`)
- ``step``, ``best_metric``
- ``models``: state dicts by role (``generator``, ``disc_x``, ``disc_y``, ...)
- ``optimizers`` / ``schedulers`` / ``scaler`` / ``rng``: everything `--resume` needs
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from revgan_med import __version__
from revgan_med.config import TASK_CHANNELS, Config, config_from_dict
from revgan_med.io.atomic import atomic_path

FORMAT = "revgan-med-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus format/version fields) to `path` atomically."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code from the file is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({exc})".splitlines()[0]) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a revgan-med checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {payload['format_version']} is newer than this version")
    return payload


def checkpoint_config(payload: dict[str, Any]) -> Config:
    """The `Config` a checkpoint was trained with."""
    return config_from_dict(payload["config"])


def generator_from_checkpoint(
    payload: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config]:
    """Rebuild the generator a checkpoint describes, load its weights, and put it in eval mode."""
    from revgan_med.networks import build_generator

    config = checkpoint_config(payload)
    channels = TASK_CHANNELS[config.task]
    generator = build_generator(
        config.model.generator,
        in_channels=channels,
        out_channels=channels,
        width=config.model.width,
        depth=config.model.depth,
        memory_saving=config.model.memory_saving,
    )
    generator.load_state_dict(payload["models"]["generator"])
    return generator.to(device).eval(), config
