"""Typed configs: YAML, overrides, and errors naming the valid keys."""
import pytest

from metakit.config import ConfigError, dump_config, from_dict, load_config

import yaml
from pathlib import Path

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def test_overrides_are_typed_and_applied():
    c = load_config(None, ["train.steps=7", "train.lr=0.5", "model.hidden=16", "data.rotations=false"])
    assert (c.train.steps, c.train.lr, c.model.hidden, c.data.rotations) == (7, 0.5, 16, False)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown key train.stepz; valid keys in train: ways, shots"):
        load_config(None, ["train.stepz=7"])
    with pytest.raises(ConfigError, match="unknown key model.hiden; valid keys in model: hidden"):
        load_config(None, ["model.hiden=7"])
    with pytest.raises(ConfigError, match="valid top-level keys: name, algorithm"):
        from_dict({"trian": {}})


def test_wrong_type_and_unknown_algorithm_and_missing_file():
    with pytest.raises(ConfigError, match="train.steps must be int, got 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="unknown algorithm 'mamal'; choose one of"):
        load_config(None, ["algorithm=mamal"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_round_trip_through_yaml():
    c = load_config(None, ["train.steps=3", "model.hidden=8"])
    assert from_dict(yaml.safe_load(dump_config(c))) == c


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


def test_optimizer_and_schedule_are_checked_when_read():
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of step, linear, got 'cosine'"):
        load_config(None, ["train.lr_schedule=cosine"])
    with pytest.raises(ConfigError, match="train.optimizer must be one of adam, sgd, got 'rmsprop'"):
        load_config(None, ["train.optimizer=rmsprop"])
