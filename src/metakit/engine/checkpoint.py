"""Checkpoints: config + weights + metakit version, written atomically, loaded with clear errors."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import __version__
from ..algorithms import Learner, build_learner
from ..config import Config, ConfigError, apply_overrides, from_dict


class CheckpointError(RuntimeError):
    """A missing, damaged or mismatched checkpoint."""


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def build_from_config(config: Config) -> Learner:
    in_channels = config.data.channels if config.data.dataset == "folder" else 1
    task = "regression" if config.data.dataset == "sinusoid" else "classification"
    return build_learner(config.algorithm, config.model, in_channels=in_channels, image_size=config.data.image_size,
                         ways=config.train.ways, task=task)


def resolve(path: str | Path, which: str = "best") -> Path:
    """A checkpoint file, or ``RUN_DIR/<which>.pt`` (falling back to ``last.pt``) for a run folder."""
    path = Path(path)
    if path.is_dir():
        for name in (f"{which}.pt", "last.pt"):
            if (path / name).exists():
                return path / name
        raise CheckpointError(f"{path} holds no checkpoint ({which}.pt or last.pt); is it a metakit run folder?")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    return path


def read(path: str | Path) -> dict:
    """The raw checkpoint dict, with one clear error for anything that is not a metakit checkpoint."""
    path = resolve(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is damaged or not a checkpoint "
                              f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a metakit checkpoint (no config and weights in it)")
    return state


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's buffers: not weights


def load_weights(learner: Learner, state: dict, path: str | Path, algorithm: str,
                 fresh_statistics: bool = False) -> list[str]:
    """``state``'s weights into ``learner``, or one clear error naming the first mismatch.

    ``fresh_statistics`` (a new run from these weights, ``metakit train --init``): BatchNorm running
    statistics the checkpoint lacks (weights trained with ``bn="batch"`` into a learner with ``running`` or
    ``per_step``) keep the learner's fresh values, for the run to fill, and those the learner does not
    keep are dropped. Returns the names of the statistics left fresh."""
    model = dict(state["model"])
    fresh = []
    if fresh_statistics:
        own = learner.state_dict()
        fresh = [k for k in own if k not in model and k.rsplit(".", 1)[-1] in STATISTICS]
        model = {k: v for k, v in model.items() if k in own or k.rsplit(".", 1)[-1] not in STATISTICS}
        model.update({k: own[k] for k in fresh})
    try:
        learner.load_state_dict(model)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise CheckpointError(f"{path}: its weights do not fit a {algorithm} learner with these options "
                              f"({first[0].strip()}); was the file edited or written for another architecture?") from None
    return fresh


def load(path: str | Path, model_overrides: list[str] | None = None) -> Learner:
    """The learner stored in a checkpoint (file or run folder), in eval mode, ready to ``adapt``.

    ``learner.transform`` is the input transform of its data (see :mod:`metakit.data.transforms`),
    ``learner.config`` the config it was trained with. ``model_overrides`` (``["model.inner_steps_test=10"]``)
    change options that leave the weights' shapes alone, e.g. the number of inner steps at test.
    """
    state = read(path)
    for text in model_overrides or []:
        if not text.startswith("model."):
            raise ConfigError(f"--set {text}: only model.* options can change at evaluation "
                              "(the episodes have --ways, --shots, --queries, --episodes)")
    try:
        config = from_dict(apply_overrides(state["config"], model_overrides))
    except (ConfigError, ValueError) as exc:
        if model_overrides and isinstance(exc, ConfigError):
            raise  # names the bad override
        raise CheckpointError(f"{path}: its config cannot be rebuilt by metakit {__version__} ({exc})") from None
    learner = build_from_config(config)
    load_weights(learner, state, path, config.algorithm)
    learner.config = config
    learner.transform = state.get("transform") or {}
    learner.eval()
    return learner


def save(path, learner: Learner, config: Config, transform: dict | None = None, **extra) -> Path:
    return atomic_save({"metakit_version": __version__, "config": config.to_dict(), "model": learner.state_dict(),
                        "transform": transform or {}, **extra}, path)
