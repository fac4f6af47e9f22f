"""Checks that stop a run with one clear line instead of training on, or resuming, the wrong thing."""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from revgan_med.checkpoints import RESUME_KEYS, checkpoint_config, load_checkpoint, require_keys
from revgan_med.config import Config, ConfigError

# what decides the shapes of the saved weights: a resume must not change it
_WEIGHT_KEYS = ("task", "objective", "model", "loss.registration_width", "loss.registration_levels")


class NonFiniteLoss(ValueError):
    """A loss or a weight became NaN or infinite: training stops before the weights are saved."""


def require_finite_losses(losses: Mapping[str, float], step: int) -> None:
    """Stop at the first step whose loss is not finite, naming the step and the loss term."""
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    if bad:
        term = next((n for n in bad if n not in ("g_loss", "d_loss")), bad[0])  # a term, not the total
        raise NonFiniteLoss(
            f"step {step}: loss {term} is {losses[term]} (not finite); training stopped and nothing was "
            "saved from this step — check the data for NaN/Inf voxels or lower train.lr"
        )


def require_finite_weights(modules: Mapping[str, torch.nn.Module], step: int) -> None:
    """Refuse to checkpoint NaN/Inf weights (an overflowing update can make them from a finite loss)."""
    for role, module in modules.items():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteLoss(
                    f"step {step}: weight {role}.{name} is not finite; training stopped without saving it "
                    "— check the data for NaN/Inf voxels or lower train.lr"
                )


def _weight_settings(values: dict) -> dict:
    out = {}
    for key in _WEIGHT_KEYS:
        node = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def check_resume(config: Config, last: Path) -> None:
    """Refuse to resume `last` with a config whose task, objective or model differ from the run's."""
    payload = load_checkpoint(last)
    try:
        require_keys(payload, RESUME_KEYS)
        saved = _weight_settings(checkpoint_config(payload).to_dict())
    except ValueError as exc:
        raise ValueError(f"{last}: {exc}") from None
    wanted = _weight_settings(config.to_dict())
    differ = [k for k in _WEIGHT_KEYS if saved[k] != wanted[k]]
    if differ:
        key, was, asks = differ[0], saved[differ[0]], wanted[differ[0]]
        if isinstance(was, dict) and isinstance(asks, dict):  # model: only the keys that differ
            sub = [k for k in asks if was.get(k) != asks[k]]
            was, asks = {k: was.get(k) for k in sub}, {k: asks[k] for k in sub}
        raise ConfigError(
            f"{last}: the run was trained with {key} {was!r}, the config asks for {asks!r}; "
            "resume with the run's own config (leave out --config) or train into a new --output"
        )


# what a run writes into its folder; only these are removed after a failed start
RUN_ENTRIES = ("config.yaml", "metrics.csv", "tensorboard", "checkpoints")


@contextlib.contextmanager
def fresh_run_cleanup(run_dir: Path, *, enabled: bool) -> Iterator[None]:
    """On failure of a new run before its first checkpoint, remove what it wrote (config.yaml,
    metrics.csv, tensorboard/, an empty checkpoints/), so the folder reads as if it had never started.
    Entries that were there before, and anything else in the folder, are left alone."""
    existed = run_dir.exists()
    before = {name for name in RUN_ENTRIES if (run_dir / name).exists()}
    try:
        yield
    except BaseException:
        if enabled and not any((run_dir / "checkpoints").glob("*.pt")):
            for name in set(RUN_ENTRIES) - before:
                entry = run_dir / name
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.exists():
                    entry.unlink()
            if not existed and run_dir.exists() and not any(run_dir.iterdir()):
                run_dir.rmdir()
        raise
