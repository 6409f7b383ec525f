"""Typed experiment configs: dataclasses, loaded from YAML, overridden with ``key=value``.

A config has five parts: ``algorithm`` (a registered name) with its ``model`` options
(the algorithm's own ``Options`` dataclass), ``data`` (where tasks come from), ``train``
(the meta-training episodes and optimisation), ``eval`` (the test episodes). Unknown keys
fail with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .algorithms import options_class


class ConfigError(ValueError):
    """A config that cannot be built: unknown key, wrong type, missing file."""


@dataclass
class DataConfig:
    dataset: str = "omniglot"        # omniglot | sinusoid | folder
    root: str | None = None          # data root; None: $METAKIT_DATA or ~/.cache/metakit
    scheme: str = "vinyals"          # omniglot class split: vinyals | maml | lake
    image_size: int = 28
    rotations: bool = True           # rotated characters as new classes
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    download: bool = True
    # folder data sets (one sub-folder per class)
    path: str | None = None
    channels: int = 1
    invert: bool = True              # dark ink on light paper -> ink 1
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # train / val / test classes
    split_classes: dict | None = None  # or explicit lists: {train: [class, ...], val: [...], test: [...]}


def _at_least(config, section: str, low: int, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(config, key) < low:
            raise ConfigError(f"{section}.{key} must be >= {low}, got {getattr(config, key)}")


@dataclass
class TrainConfig:
    ways: int = 60
    shots: int = 1
    queries: int = 5                 # per class
    meta_batch_size: int = 1
    steps: int = 10000               # meta-training iterations (episodes / meta-batches)
    optimizer: str = "adam"          # adam | sgd
    lr: float = 1e-3
    lr_schedule: str = "step"        # step: times lr_gamma every lr_step iterations | linear: to 0 at `steps`
    lr_step: int = 2000              # with lr_schedule=step; 0: constant
    lr_gamma: float = 0.5
    momentum: float = 0.9            # sgd only (Reptile's outer loop: 0)
    max_grad_norm: float = 0.0       # clip the meta-gradient's global norm (Meta-Learner LSTM: 0.25); 0: off
    tasks_per_backward: int = 0      # backward after every this many tasks (memory of one chunk); 0: one backward
    weight_decay: float = 0.0
    log_every: int = 50
    val_every: int = 500
    val_episodes: int = 200
    checkpoint_every: int = 500
    threads: int = 0                 # torch threads; 0: torch's default
    within_alphabet: float = 0.0     # Omniglot: fraction of training tasks whose classes share one alphabet

    def __post_init__(self) -> None:
        for key, value, choices in (("optimizer", self.optimizer, ("adam", "sgd")),
                                    ("lr_schedule", self.lr_schedule, ("step", "linear"))):
            if value not in choices:
                raise ConfigError(f"train.{key} must be one of {', '.join(choices)}, got {value!r}")
        _at_least(self, "train", 1, ("ways", "shots", "queries", "meta_batch_size", "val_episodes"))
        # 0: tasks_per_backward one backward; lr_step a constant rate; val_every no validation; log_every and
        # checkpoint_every at the last step only
        _at_least(self, "train", 0, ("steps", "tasks_per_backward", "lr_step", "log_every", "val_every",
                                     "checkpoint_every", "threads", "lr", "weight_decay", "max_grad_norm"))
        if not 0.0 <= self.within_alphabet <= 1.0:
            raise ConfigError(f"train.within_alphabet is a fraction of tasks in [0, 1], got {self.within_alphabet}")


@dataclass
class EvalConfig:
    ways: int = 5
    shots: int = 1
    queries: int = 15                # per class
    episodes: int = 1000
    batch: int = 50                  # episodes evaluated together

    def __post_init__(self) -> None:
        _at_least(self, "eval", 1, ("ways", "shots", "queries", "episodes", "batch"))


@dataclass
class Config:
    name: str = "experiment"
    algorithm: str = "protonet"
    seed: int = 0
    model: typing.Any = None         # the algorithm's Options dataclass
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = options_class(self.algorithm)()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value, annotation, key: str):
    """Check/convert ``value`` to the field's declared type (given as a string annotation)."""
    ann = str(annotation)
    try:
        if value is None:
            if "None" in ann:
                return None
            raise TypeError
        if ann.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise TypeError
            if not isinstance(value, bool):
                raise TypeError
            return value
        if ann.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if ann.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if ann.startswith("dict"):
            if not isinstance(value, dict):
                raise TypeError
            return value
        if ann.startswith("str"):
            return str(value)
        if ann.startswith("list[float]") or ann.startswith("tuple[float"):
            if isinstance(value, str):
                value = [v for v in value.strip("[]()").split(",") if v.strip()]
            return [float(v) for v in value]
        if ann.startswith("list[int]") or ann.startswith("tuple[int"):
            if isinstance(value, str):
                value = [v for v in value.strip("[]()").split(",") if v.strip()]
            return [int(v) for v in value]
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {ann}, got {value!r}") from None


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {values!r}")
    fields = _fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}; valid keys in {prefix}: {', '.join(fields)}")
    return cls(**{k: _coerce(v, fields[k].type, f"{prefix}.{k}") for k, v in values.items()})


def from_dict(values: dict) -> Config:
    values = dict(values or {})
    top = _fields(Config)
    unknown = sorted(set(values) - set(top))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]}; valid top-level keys: {', '.join(top)}")
    algorithm = values.get("algorithm", Config.algorithm)
    try:
        options = options_class(algorithm)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    kwargs = {k: _coerce(values[k], top[k].type, k) for k in ("name", "algorithm", "seed") if k in values}
    kwargs["model"] = _build(options, values.get("model") or {}, "model")
    for section, cls in _SECTIONS.items():
        kwargs[section] = _build(cls, values.get(section) or {}, section)
    return Config(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``["train.steps=100", "model.hidden=32"]`` applied to a raw config dict."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (values or {}).items()}
    for text in overrides or []:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
        node[path[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} not found; the shipped ones are under configs/")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None
    return from_dict(apply_overrides(values, overrides or []))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
