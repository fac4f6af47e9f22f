"""Self-describing checkpoints: reading and writing them, and rebuilding the model they hold.

Below both training (which writes them) and inference (which reads them). A checkpoint is a plain dict
of tensors and plain data (loadable with ``weights_only=True``):

- ``format`` / ``format_version`` / ``package_version``
- ``config``: the fully resolved `Config` as nested plain data (task, objective, model, window, ...)
- ``spec``: the experiment spec (`revgan_med.tasks.TaskSpec`: task, channels, window, factors,
  upsampling, patch); checkpoints written before it existed get it from ``config``
- ``intensity``: the intensity mapping as plain data (`revgan_med.data.transforms`)
- ``step``, ``best_metric``
- ``models``: state dicts by role (``generator``, ``disc_x``, ``disc_y``, ...); with ``train.ema_decay``
  the generator's is the weight average, and ``training_generator`` / ``ema_updates`` hold the trained
  weights and the average's count (`revgan_med.training.averaging`)
- ``optimizers`` / ``schedulers`` / ``scaler`` / ``rng``: everything `--resume` needs
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revgan_med import __version__
from revgan_med.config import Config, config_from_dict
from revgan_med.io.atomic import atomic_path
from revgan_med.networks import build_generator
from revgan_med.networks.selfinverse import SelfInverseGenerator
from revgan_med.tasks import TASK_CHANNELS, TaskSpec
from revgan_med.tiling import DEFAULT_MARGIN

FORMAT = "revgan-med-checkpoint"
FORMAT_VERSION = 1
MODEL_FORMAT = "revgan-med-model"  # an exported model (`revgan_med.export`): generator weights and spec only
INFERENCE_KEYS = ("config", "intensity", "models")
RESUME_KEYS = (*INFERENCE_KEYS, "step", "best_metric", "data_position", "objective_state", "optimizers",
               "schedulers", "scaler", "rng")  # fmt: skip


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
        what = (
            "it holds Python objects besides tensors and plain data, and loading those could run code"
            if "Unsupported global" in str(exc)
            else "truncated, damaged or not a PyTorch file"
        )
        raise ValueError(f"{path}: not a readable checkpoint ({what})") from None
    if isinstance(payload, dict) and payload.get("format") == MODEL_FORMAT and not exported_ok:
        raise ValueError(f"{path}: an exported model holds no training state; resume from a run's checkpoint")
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, MODEL_FORMAT):
        raise ValueError(f"{path}: not a revgan-med checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {payload['format_version']} is newer than this version")
    return payload


def require_keys(payload: dict[str, Any], keys: tuple[str, ...] = INFERENCE_KEYS) -> None:
    """Refuse a checkpoint that lacks what inference (or, with `RESUME_KEYS`, a resume) needs."""
    missing = [k for k in keys if k not in payload]
    if "models" in payload and "generator" not in (payload["models"] or {}):
        missing.append("models.generator")
    if missing:
        raise ValueError(
            f"checkpoint lacks {', '.join(missing)} (damaged, or not written by revgan-med train)"
        )


def checkpoint_config(payload: dict[str, Any]) -> Config:
    """The `Config` a checkpoint was trained with (a ValueError, not a usage error, when it is invalid)."""
    require_keys(payload, ("config",))
    try:
        return config_from_dict(payload["config"])
    except ValueError as exc:
        raise ValueError(f"checkpoint config is not valid ({exc})") from None


def checkpoint_spec(payload: dict[str, Any]) -> TaskSpec:
    """The experiment spec a checkpoint carries (rebuilt from its config for older checkpoints)."""
    if "spec" in payload:
        return TaskSpec.from_dict(payload["spec"])
    return TaskSpec.from_config(checkpoint_config(payload))


def build_generator_from_config(config: Config) -> torch.nn.Module:
    """The (freshly initialised) generator that `config.model` describes for `config.task`."""
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
    require_keys(payload, ("config", "models"))
    config = checkpoint_config(payload)
    generator = build_generator_from_config(config)
    if config.objective == "self-inverse":  # one function f = f⁻¹: `inverse` is `forward`
        generator = SelfInverseGenerator.from_generator(generator)
    try:
        generator.load_state_dict(payload["models"]["generator"])
    except RuntimeError as exc:  # size mismatch / missing keys: a config edited apart from its weights
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        m = config.model
        raise ValueError(
            f"the generator weights do not fit the checkpoint's model config ({m.generator}, width "
            f"{m.width}, depth {m.depth}): {detail[:200]}"
        ) from None
    return generator.to(device).eval(), config


@dataclass
class Model:
    """A generator plus everything inference needs from its checkpoint.

    `generator` has ``forward`` (X→Y) and ``inverse`` (Y→X) on (B, C, X, Y, Z) in network units;
    `intensity` is the mapping's ``to_dict()``; `patch_size` the training patch; `target_size` /
    `context_size` the checkpoint's windows (None: `revgan_med.tiling.window_sizes`); `margin` the
    generator's receptive radius, kept around every target window; `ensemble` whether its outputs are
    the flip self-ensemble unless the caller says otherwise (``infer.ensemble``).
    """

    generator: torch.nn.Module
    task: str
    intensity: dict[str, Any]
    patch_size: tuple[int, int, int]
    factors: tuple[int, int, int] = (1, 1, 1)
    upsample: str = "nearest"
    target_size: int | Sequence[int] | None = None
    context_size: int | Sequence[int] | None = None
    margin: int = DEFAULT_MARGIN
    batch_size: int = 1
    ensemble: bool = False
    name: str = "model"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def model_from_checkpoint(payload: dict[str, Any], device: torch.device) -> Model:
    """The `Model` of a loaded checkpoint, its generator on `device` in eval mode; task, window,
    factors, upsampling and patch come from the checkpoint's spec."""
    generator, config = generator_from_checkpoint(payload, device)
    spec = checkpoint_spec(payload)
    radius = getattr(generator, "receptive_radius", None)
    return Model(
        generator=generator,
        task=spec.task,
        intensity=dict(payload["intensity"]),
        patch_size=spec.patch_size,
        factors=spec.factors,
        upsample=spec.upsample,
        target_size=config.infer.target_size,
        context_size=config.infer.context_size,
        margin=radius() if radius is not None else DEFAULT_MARGIN,
        batch_size=config.infer.batch_size,
        ensemble=config.infer.ensemble,
        name=f"{config.model.generator} {spec.task}",
        device=device,
    )
