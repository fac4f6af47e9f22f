"""Experiment configuration: typed dataclasses, strict YAML loading and `--set key.path=value` overrides.

Every key has a default (the thesis settings, ``000_*`` §4.3, §5.3–5.5); an unknown key or a value of
the wrong type is a one-line ``ConfigError`` naming the key. The config object stops at the CLI: the
library functions take plain, typed arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

TASKS = ("ct-sr", "ct-kernel", "dmri-sr")
# image channels per task: CT is one HU channel, dMRI the 6 free components of the diffusion tensor
TASK_CHANNELS = {"ct-sr": 1, "ct-kernel": 1, "dmri-sr": 6}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


# how a thick-slice scan is mapped onto the HR grid (`revgan_med.data.degradation.upsample_to_hr`)
UPSAMPLE_MODES = ("nearest", "trilinear", "tricubic")


@dataclass
class DataConfig:
    datalist: str = "datalist.json"
    window: str | list[float] = "chest-1024"  # preset name or [min, max] in HU
    patch_size: list[int] = field(default_factory=lambda: [128, 128, 128])
    samples_per_volume: int = 4
    foreground_fraction: float = 0.01
    factors: list[int] = field(default_factory=lambda: [2, 2, 4])  # super-resolution x, y, z
    upsample: str = field(default="nearest", metadata=_choices(*UPSAMPLE_MODES))
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
    lambda_l1: float = 100.0
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
    amp: bool = False
    seed: int = 0
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))


@dataclass
class InferConfig:
    target_size: int = 64
    context_size: int | None = None  # None = training patch size
    batch_size: int = 1


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
    if config.loss.gan != "none":  # refused here rather than after the set-up, at the first GAN step
        from revgan_med.networks.discriminators import patch_problem

        if problem := patch_problem(config.data.patch_size):
            raise ConfigError(f"config key 'data.patch_size': {problem} (or set loss.gan=none)")
    return config


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
    from revgan_med.io.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
