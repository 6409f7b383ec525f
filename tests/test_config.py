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


@pytest.mark.parametrize("override, message", [
    ("train.shots=0", "train.shots must be >= 1, got 0"),
    ("train.meta_batch_size=0", "train.meta_batch_size must be >= 1, got 0"),
    ("train.val_every=-5", "train.val_every must be >= 0, got -5"),
    ("train.lr=-0.001", "train.lr must be >= 0, got -0.001"),
    ("eval.queries=0", "eval.queries must be >= 1, got 0"),
    ("eval.episodes=-1", "eval.episodes must be >= 1, got -1"),
])
def test_counts_and_rates_out_of_range_fail_when_read(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_zero_log_and_checkpoint_intervals_mean_at_the_end_only(tmp_path):
    """``train.log_every=0`` and ``train.checkpoint_every=0`` log and save at the last step only (they used to
    divide by zero after the first step)."""
    import json

    from metakit.engine import fit
    from synthetic import folder_config, make_image_folder

    root = make_image_folder(tmp_path / "data", classes=12, per_class=4, size=28)
    config = from_dict(folder_config(root, steps=3, val_every=0, log_every=0, checkpoint_every=0))
    run = tmp_path / "run"
    fit(config, run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3]
    assert (run / "last.pt").exists()
