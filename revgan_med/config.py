"""Experiment configuration: typed dataclasses, strict YAML loading and `--set key.path=value` overrides.

Every key has a default (the thesis settings, ``000_*`` §4.3, §5.3–5.5); an unknown key or a value of
the wrong type is a one-line ``ConfigError`` naming the key. The config object stops at the CLI: the
library functions take plain, typed arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from revgan_med.tasks import DEFAULT_FACTORS, DEFAULT_WINDOW, TASKS, UPSAMPLE_MODES

MIN_PATCH_SIDE = 8  # the smallest training patch side the adapted PatchGAN is built for


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass
class DataConfig:
    datalist: str = "datalist.json"
    window: str | list[float] = DEFAULT_WINDOW  # preset name or [min, max] in HU
    patch_size: list[int] = field(default_factory=lambda: [128, 128, 128])
    samples_per_volume: int = 4
    foreground_fraction: float = 0.01
    factors: list[int] = field(default_factory=lambda: list(DEFAULT_FACTORS))  # super-resolution x, y, z
    upsample: str = field(default="nearest", metadata=_choices(*UPSAMPLE_MODES))
    # random mirror images of each training patch along every axis and, where patch and factors are
    # square in-plane, quarter turns in-plane (CT only: DTI components would have to turn with them)
    augment: bool = False
    num_workers: int = 2


@dataclass
class ModelConfig:
    generator: str = "rev_resnet3d"
    width: int = 32
    depth: int = 4
    memory_saving: bool = True
    residual: bool = False  # output = input + correction (not in the thesis; see build_generator)
    linear_kernel: list[int] | None = None  # e.g. [7, 7, 1]: a linear filter path per direction
    disc_width: int = 64


@dataclass
class LossConfig:
    gan: str = field(default="lsgan", metadata=_choices("lsgan", "vanilla", "none"))
    lambda_l1: float = 100.0  # weight of the paired objective's pixel term, whichever `pixel` criterion
    # paired: the pixel criterion, l1 (thesis) or mse, which PSNR measures (its optimum is the mean of
    # what the input leaves open, L1's the median)
    pixel: str = field(default="l1", metadata=_choices("l1", "mse"))
    # paired: where the pixel term, the linear paths' least-squares start and the CT validation metrics
    # count, every voxel or only the target's anatomy (CT: `ct_body`, lungs in, couch out; dMRI: brain mask)
    region: str = field(default="all", metadata=_choices("all", "body"))
    # paired CT: the values the pixel term compares, as the network's data window holds them (`data`) or
    # clipped to the task's metric window, as its metrics see them (`metric`; ct-kernel: nlst)
    window: str = field(default="data", metadata=_choices("data", "metric"))
    # paired: weight of the Y → X terms (L1, GAN) against X → Y; 0 trains X → Y only and skips computing
    # Y → X, which halves a step (super-resolution users need thick → thin alone)
    lambda_inverse: float = 1.0
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.0
    pool_size: int = 50
    # reggan (004_* Table 1): Corr = L1(F(x) ∘ T, y), Smooth = mean squared gradient of T, Adv
    lambda_corr: float = 20.0
    lambda_smooth: float = 10.0
    lambda_adv: float = 1.0
    # the registration network R is part of the corrected loss (not used at inference)
    registration_width: int = 16
    registration_levels: int = 3


@dataclass
class TrainConfig:
    steps: int = 20000
    batch_size: int = 1
    lr: float = 2.0e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    decay_start: int = 10000
    val_every: int = 1000
    checkpoint_every: int = 1000
    log_every: int = 10  # metrics.csv / TensorBoard rows hold the mean losses over this many steps
    linear_fit_batches: int = 32  # paired data: least-squares start of model.linear_kernel's paths
    # fit those paths mirror-symmetric (and x↔y-symmetric when square in-plane), as reconstruction kernels
    # are: an unconstrained fit also learns the asymmetries of the training anatomy
    linear_fit_symmetric: bool = False
    # CT paired, residual, with model.linear_kernel: `strongest` starts each direction from the plain input,
    # a Gaussian blur or an unsharp mask of a grid (`Objective.choose_linear_start`) where one is 1 dB above
    # the least-squares fit in the task's metric window on the fit batches; `least-squares`: the fit
    linear_start: str = field(default="least-squares", metadata=_choices("least-squares", "strongest"))
    # > 0: validate, keep as best.pt and infer an exponential moving average of the generator's weights
    # with this decay (warmed up: min(decay, (1 + n) / (10 + n)) at update n); 0: the trained weights
    ema_decay: float = 0.0
    amp: bool = False
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ... (torchrun: a bare cuda means this rank's GPU)
    dist_timeout_s: float = 1800.0  # torchrun: limit of every collective (ranks wait while rank 0 validates)
    dist_backend: str = field(default="auto", metadata=_choices("auto", "nccl", "gloo"))  # auto: nccl on CUDA


@dataclass
class InferConfig:
    # window edges, one for all axes or [x, y, z]; both None = as large as a voxel budget allows
    # (about one pass of the network); a target alone gets the training patch as context
    target_size: int | list[int] | None = None
    context_size: int | list[int] | None = None
    batch_size: int = 1
    # the flip self-ensemble (mean over the input as given, mirrored and x/y-swapped; 4-5x the time) by
    # default, for `infer`, the Python API and exported bundles; `infer --no-ensemble` turns it off
    ensemble: bool = False


@dataclass
class Config:
    task: str = field(default="ct-sr", metadata=_choices(*TASKS))
    objective: str = "paired"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (ints are accepted for floats); return it."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"config key {where!r}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        kwargs[name] = _coerce(value, tp, key)
        allowed = fields[name].metadata.get("choices")
        if allowed and kwargs[name] not in allowed:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(allowed)}")
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    path, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return path.strip().split("."), value


def config_from_dict(values: dict[str, Any] | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a validated `Config` from nested plain data plus `key.path=value` overrides."""
    merged = _merge({}, values or {})
    for text in overrides:
        keys, value = _parse_override(text)
        node = merged
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    config = _build(Config, merged, "")
    _check_values(config)
    problem = patch_problem(config.data.patch_size) if config.loss.gan != "none" else None
    if problem:  # refused here rather than after the set-up, at the first GAN step
        raise ConfigError(f"config key 'data.patch_size': {problem} (or set loss.gan=none)")
    return config


def patch_problem(patch_size: Sequence[int]) -> str | None:
    """Why the PatchGAN cannot judge training patches of `patch_size`, or None when it can."""
    if len(patch_size) != 3 or min(patch_size) < MIN_PATCH_SIDE:
        return f"the PatchGAN needs three patch sides >= {MIN_PATCH_SIDE}, got {list(patch_size)}"
    return None


# keys whose values must be >= the bound (checked before a run writes anything)
_AT_LEAST = {
    "data.samples_per_volume": 1, "data.num_workers": 0, "model.width": 1, "model.depth": 0,
    "model.disc_width": 1, "train.steps": 1, "train.batch_size": 1, "train.decay_start": 0,
    "train.val_every": 1, "train.checkpoint_every": 1, "train.log_every": 1, "train.linear_fit_batches": 0,
    "infer.target_size": 1, "infer.batch_size": 1, "infer.context_size": 1,
}  # fmt: skip
_TRIPLES = ("data.patch_size", "data.factors")
_PAIRED_ONLY_LOSS_KEYS = ("pixel", "region", "window", "lambda_inverse")  # no other objective reads these
_MIRRORING_KEYS = ("data.augment", "infer.ensemble")  # CT only


def _check_values(config: Config) -> None:
    """Refuse values of the right type that no run can use (``data.factors=[2,2,0]``, ``train.steps=-5``)."""

    def get(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(config, section), name)

    for key, least in _AT_LEAST.items():
        value = get(key)
        if value is not None and value < least:
            raise ConfigError(f"config key {key!r}: {value!r} must be >= {least}")
    for key in _TRIPLES:
        value = get(key)
        if len(value) != 3 or min(value) < 1:
            raise ConfigError(f"config key {key!r}: {value!r} must be three positive integers")
    if not 0 <= config.data.foreground_fraction <= 1:
        raise ConfigError(f"config key 'data.foreground_fraction': {config.data.foreground_fraction!r} "
                          "must lie in [0, 1]")  # fmt: skip
    for key in _MIRRORING_KEYS:
        if get(key) and config.task == "dmri-sr":
            raise ConfigError(f"config key {key!r}: not for dmri-sr (it mirrors volumes, which suits "
                              "scalar volumes only: a mirrored diffusion tensor's components change sign)")
    m = config.model
    startable = config.objective == "paired" and m.residual and m.linear_kernel and config.task != "dmri-sr"
    if config.train.linear_start == "strongest" and not startable:
        raise ConfigError("config key 'train.linear_start': 'strongest' needs a CT task, objective paired, "
                          "model.residual: true and a model.linear_kernel")
    if config.loss.window == "metric" and config.task == "dmri-sr":
        raise ConfigError("config key 'loss.window': 'metric' is for CT tasks; dmri-sr has no metric window")
    if config.loss.lambda_inverse < 0:
        raise ConfigError(f"config key 'loss.lambda_inverse': {config.loss.lambda_inverse!r} must be >= 0")
    for key in _PAIRED_ONLY_LOSS_KEYS:  # away from their defaults only where the paired objective uses them
        if getattr(config.loss, key) != getattr(LossConfig, key) and config.objective != "paired":
            raise ConfigError(f"config key 'loss.{key}': only the paired objective uses it, objective is "
                              f"{config.objective!r}")  # fmt: skip
    if not 0 <= config.train.ema_decay < 1:
        raise ConfigError(f"config key 'train.ema_decay': {config.train.ema_decay!r} must be in [0, 1)")
    if config.train.lr < 0:  # 0 is allowed: a run that only fits or evaluates
        raise ConfigError(f"config key 'train.lr': {config.train.lr!r} must be >= 0")
    if len(config.train.betas) != 2 or not all(0 <= b < 1 for b in config.train.betas):
        raise ConfigError(f"config key 'train.betas': {config.train.betas!r} must be two numbers in [0, 1)")


def _merge(into: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    for k, v in values.items():
        into[k] = _merge(dict(into.get(k) or {}), v) if isinstance(v, dict) else v
    return into


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config file (or only defaults when `path` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict(values, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def save_config(config: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    from revgan_med.io.atomic import atomic_write_text  # the CLI imports this module: `--help` stays light

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
