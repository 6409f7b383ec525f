"""Gradient-based learners learn: short runs of the shipped configs (slow: ``pytest -m slow``), and
every shipped config builds a learner whose head fits its evaluation episodes."""
import os
from pathlib import Path

import pytest
import yaml
import torch

from metakit.algorithms import MAML
from metakit.config import load_config
from metakit.data import load_split, make_sampler
from metakit.engine import evaluate, fit
from metakit.engine.checkpoint import build_from_config

CONFIGS = Path(__file__).parents[1] / "configs"
GRADIENT = sorted(p for p in CONFIGS.rglob("*.yaml")
                  if yaml.safe_load(p.read_text()).get("algorithm") in ("maml", "fomaml", "anil", "metasgd", "reptile"))


def data_root() -> Path | None:
    """$METAKIT_DATA, else the offline mirror beside the checkout (../shared/data), when it holds Omniglot."""
    for root in (os.environ.get("METAKIT_DATA"), Path(__file__).parents[2] / "shared" / "data"):
        if root and (Path(root) / "omniglot" / "images_background.zip").exists():
            return Path(root)
    return None


@pytest.mark.parametrize("path", GRADIENT, ids=[p.name for p in GRADIENT])
def test_shipped_configs_build_a_learner_for_their_evaluation(path):
    config = load_config(path)
    learner = build_from_config(config)
    assert isinstance(learner, MAML) and learner.grad_at_test
    if config.data.dataset == "omniglot":
        assert config.eval.ways == config.train.ways == learner.ways
    else:
        assert learner.ways is None


SHORT_RUNS = {  # config: meta-iterations of 8 tasks (Reptile: its own meta-batch of 5), Conv4 with 32 filters
    "maml_5w1s": 250, "fomaml_5w1s": 250, "anil_5w1s": 250, "metasgd_5w1s": 250, "reptile_5w1s": 150}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHORT_RUNS))
def test_well_above_chance_on_omniglot_after_a_short_run(name, tmp_path):
    """Measured here: MAML 0.61 and first-order 0.66 after 250 iterations (their strided configs since
    session 5; 0.80 and 0.51 with the max-pool ones), ANIL 0.69 and Meta-SGD 0.87 after 200, Reptile 0.74
    after 300 (non-transductive); chance is 0.2."""
    root = data_root()
    if root is None:
        pytest.skip("Omniglot archives not found: set METAKIT_DATA to a folder holding omniglot/")
    torch.set_num_threads(1)
    batch = [] if name.startswith("reptile") else ["train.meta_batch_size=8"]
    config = load_config(CONFIGS / "omniglot" / f"{name}.yaml", batch + [
        f"data.root={root}", "data.download=false", "model.hidden=32", f"train.steps={SHORT_RUNS[name]}",
        "train.val_every=0", "train.log_every=50", "train.checkpoint_every=1000"])
    result = fit(config, tmp_path / "run", progress=False)
    test_set = load_split(config.data, "test")
    e = config.eval
    sampler = make_sampler(config.data, test_set, e.ways, e.shots, e.queries, 1, seed=0)
    accuracy = evaluate(result.learner, sampler, episodes=60)["accuracy"]
    assert accuracy > 0.4, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("name,test_steps", [("maml_10shot", 10), ("metasgd_10shot", 1)])
def test_low_mse_on_sinusoids_after_a_short_run(name, test_steps, tmp_path):
    """Measured here after 1500 iterations of 10 tasks: MAML 0.7 after 10 test steps (1.5 after one),
    Meta-SGD 0.4 after its one step; an untrained network predicts about 0, MSE ~ E[A^2]/2 ~ 4."""
    torch.set_num_threads(1)
    config = load_config(CONFIGS / "sinusoid" / f"{name}.yaml", [
        "train.steps=1500", "train.meta_batch_size=10", "train.val_every=0", "train.log_every=500",
        "train.checkpoint_every=10000", f"model.inner_steps_test={test_steps}"])
    result = fit(config, tmp_path / "run", progress=False)
    sampler = make_sampler(config.data, None, 0, 10, 100, 1, seed=1)
    torch.manual_seed(0)
    before = evaluate(type(result.learner)(config.model, task="regression"), sampler, episodes=100)["mse"]
    mse = evaluate(result.learner, sampler, episodes=100)["mse"]
    assert mse < 1.0 and mse < before / 4, (mse, before)
