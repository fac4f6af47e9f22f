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

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revgan_med import __version__
from revgan_med.config import TASK_CHANNELS, Config, config_from_dict
from revgan_med.io.atomic import atomic_path

FORMAT = "revgan-med-checkpoint"
FORMAT_VERSION = 1
MODEL_FORMAT = "revgan-med-model"  # an exported model (`revgan_med.export`): generator weights and spec only


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus format/version fields) to `path` atomically."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, exported_ok: bool = False
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code from the file is executed).

    `exported_ok` also accepts an exported model file (enough for inference, not for resuming).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({exc})".splitlines()[0]) from None
    if isinstance(payload, dict) and payload.get("format") == MODEL_FORMAT and not exported_ok:
        raise ValueError(f"{path}: an exported model holds no training state; resume from a run's checkpoint")
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, MODEL_FORMAT):
        raise ValueError(f"{path}: not a revgan-med checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {payload['format_version']} is newer than this version")
    return payload


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python RNG states as tensors and plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNGs to what `capture_rng_state` returned (CUDA only where saved and available)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def checkpoint_config(payload: dict[str, Any]) -> Config:
    """The `Config` a checkpoint was trained with."""
    return config_from_dict(payload["config"])


def build_generator_from_config(config: Config) -> torch.nn.Module:
    """The (freshly initialised) generator that `config.model` describes for `config.task`."""
    from revgan_med.networks import build_generator

    channels = TASK_CHANNELS[config.task]
    model = config.model
    return build_generator(
        model.generator,
        in_channels=channels,
        out_channels=channels,
        width=model.width,
        depth=model.depth,
        memory_saving=model.memory_saving,
        residual=model.residual,
        linear_kernel=model.linear_kernel,
    )


def generator_from_checkpoint(
    payload: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config]:
    """Rebuild the generator a checkpoint describes, load its weights, and put it in eval mode."""
    config = checkpoint_config(payload)
    generator = build_generator_from_config(config)
    if config.objective == "self-inverse":  # one function f = f⁻¹: `inverse` is `forward`
        from revgan_med.training.objectives_registration import SelfInverseGenerator

        generator = SelfInverseGenerator.from_generator(generator)
    generator.load_state_dict(payload["models"]["generator"])
    return generator.to(device).eval(), config
