"""The engine: 95% CI, training, resume equivalence, checkpoints."""
import json
import math

import pytest
import torch

import metakit
from metakit.config import from_dict
from metakit.engine import CheckpointError, evaluate, fit, mean_ci95
from metakit.engine.fit import Experiment

from synthetic import folder_config, make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def test_ci95_formula():
    mean, ci = mean_ci95([1.0, 0.0, 1.0, 1.0])
    # sample std of (1, 0, 1, 1) is 0.5; 1.96 * 0.5 / sqrt(4) = 0.49
    assert mean == 0.75 and math.isclose(ci, 0.49)
    assert mean_ci95([0.3] * 10) == (0.3, 0.0)


def _weights(learner):
    return {k: v.clone() for k, v in learner.state_dict().items()}


def _records(run_dir):
    drop = {"tasks_per_s", "elapsed_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fit_writes_run_folder_and_learns(folder, tmp_path):
    config = from_dict(folder_config(folder, steps=12))
    result = fit(config, tmp_path / "run", progress=False)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"last.pt", "best.pt", "metrics.jsonl", "config.yaml"} <= names
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records if "val_accuracy" in r] == [4, 8, 12]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[0] == 1e-2 and lrs[-1] == pytest.approx(1e-2 / 8)  # halved every 4 steps, 12 steps
    assert result.best["accuracy"] == max(r["val_accuracy"] for r in records if "val_accuracy" in r)


class CrashingSampler:
    """Wraps a sampler and raises on its ``n``-th draw, as a killed process would stop."""

    def __init__(self, sampler, n):
        self.sampler, self.n, self.calls = sampler, n, 0

    def sample(self, *a):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated crash")
        return self.sampler.sample(*a)

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, s):
        self.sampler.load_state_dict(s)


def test_resume_after_crash_equals_uninterrupted_run(folder, tmp_path, monkeypatch):
    config = from_dict(folder_config(folder, steps=12))
    straight = fit(config, tmp_path / "straight", progress=False)

    original = Experiment.train_sampler
    monkeypatch.setattr(Experiment, "train_sampler", lambda self: CrashingSampler(original(self), 8))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(config, tmp_path / "resumed", progress=False)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["step"] == 6  # checkpoint_every=3
    monkeypatch.setattr(Experiment, "train_sampler", original)
    resumed = fit(config, tmp_path / "resumed", progress=False)

    a, b = _weights(straight.learner), _weights(resumed.learner)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "straight") == _records(tmp_path / "resumed")


def test_a_run_folder_without_best_pt_yet_loads_its_last_checkpoint(folder, tmp_path, monkeypatch):
    """Without validation best.pt is written at the end only; until then the run folder means last.pt."""
    config = from_dict(folder_config(folder, steps=12, val_every=0))
    original = Experiment.train_sampler
    monkeypatch.setattr(Experiment, "train_sampler", lambda self: CrashingSampler(original(self), 8))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "best.pt").exists()
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert last["step"] == 6
    learner = metakit.load(tmp_path / "run")
    assert all(torch.equal(v, last["model"][k]) for k, v in learner.state_dict().items())


def test_resume_refuses_another_config(folder, tmp_path):
    fit(from_dict(folder_config(folder, steps=3)), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=r"another config \(train.lr differ\)"):
        fit(from_dict(folder_config(folder, steps=3, lr=0.5)), tmp_path / "run", progress=False)


def test_resume_accepts_a_run_from_before_an_option_existed(folder, tmp_path):
    """A run started before metakit gained an option (stored config without the key) resumes, the
    option taking its default."""
    config = from_dict(folder_config(folder, steps=3))
    fit(config, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    del state["config"]["train"]["max_grad_norm"]
    torch.save(state, tmp_path / "run" / "last.pt")
    result = fit(config, tmp_path / "run", progress=False)  # resumes at step 3 of 3: nothing left to do
    assert result.step == 3


def test_load_returns_a_learner_ready_to_adapt(folder, tmp_path):
    config = from_dict(folder_config(folder, steps=3))
    result = fit(config, tmp_path / "run", progress=False)
    learner = metakit.load(tmp_path / "run")
    assert not learner.training and learner.transform == {"size": 28, "channels": 1, "invert": True,
                                                          "resample": "lanczos"}
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert all(torch.equal(v, best["model"][k]) for k, v in learner.state_dict().items())
    assert best["metakit_version"] == metakit.__version__
    exp = Experiment(config)
    sampler = exp.val_sampler()
    batch = sampler.sample()
    predict = learner.adapt(batch.support_x[0], batch.support_y[0])
    assert predict(batch.query_x[0]).shape == (6, 3)
    del result


def test_damaged_and_foreign_checkpoints_fail_clearly(folder, tmp_path):
    fit(from_dict(folder_config(folder, steps=2, val_every=0)), tmp_path / "run", progress=False)
    good = tmp_path / "run" / "best.pt"
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint"):
        metakit.load(damaged)
    state = torch.load(good, weights_only=False)
    state["config"]["model"]["hidden"] = 16  # weights of a 8-filter net, config of a 16-filter one
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(CheckpointError, match="do not fit a protonet learner"):
        metakit.load(other)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a metakit checkpoint"):
        metakit.load(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not found"):
        metakit.load(tmp_path / "missing.pt")


def test_evaluate_is_fixed_by_the_seed(folder):
    config = from_dict(folder_config(folder))
    exp = Experiment(config)
    a = evaluate(exp.learner, exp.val_sampler(seed=5), 10)
    b = evaluate(exp.learner, exp.val_sampler(seed=5), 10)
    c = evaluate(exp.learner, exp.val_sampler(seed=6), 10)
    assert a == b and a != c and a["episodes"] == 10 and 0 <= a["accuracy"] <= 1


def test_evaluation_episodes_do_not_depend_on_the_batching(folder):
    exp = Experiment(from_dict(folder_config(folder)))
    one = evaluate(exp.learner, exp.val_sampler(seed=1), 12, batch=1)
    seven = evaluate(exp.learner, exp.val_sampler(seed=1), 12, batch=7)
    assert one["accuracy"] == pytest.approx(seven["accuracy"]) and one["ci95"] == pytest.approx(seven["ci95"])


def test_regression_runs_through_the_same_engine(tmp_path):
    """A sinusoid learner (here: least squares on random features, defined in the test) trains
    and validates by mean squared error, and the best checkpoint is the lowest MSE."""
    from dataclasses import dataclass

    from torch import nn

    from metakit.algorithms import REGISTRY, Learner, register
    from metakit.tasks import MetaOutput

    @register("test_ridge")
    class Ridge(Learner):
        task = "regression"

        @dataclass
        class Options:
            features: int = 64

        def __init__(self, options=None, **_):
            super().__init__()
            self.freq = nn.Parameter(torch.randn(options.features))
            self.shift = nn.Parameter(torch.rand(options.features) * 6.3)

        def phi(self, x):  # [B, M, 1] -> [B, M, F]
            return torch.cos(x * self.freq + self.shift)

        def meta_loss(self, batch):
            a, b = self.phi(batch.support_x), self.phi(batch.query_x)
            eye = torch.eye(a.shape[-1])
            w = torch.linalg.solve(a.transpose(1, 2) @ a + 0.1 * eye, a.transpose(1, 2) @ batch.support_y)
            pred = b @ w  # [B, Q, 1]
            loss = (pred - batch.query_y).pow(2).mean()
            return MetaOutput(loss, pred, {"loss": loss.item(), "mse": loss.item()})

    try:
        config = from_dict({"algorithm": "test_ridge", "data": {"dataset": "sinusoid"},
                            "train": {"shots": 10, "queries": 10, "meta_batch_size": 8, "steps": 40, "lr": 1e-2,
                                      "log_every": 10, "val_every": 20, "val_episodes": 50},
                            "eval": {"shots": 10, "queries": 10}})
        result = fit(config, tmp_path / "run", progress=False)
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        vals = [r["val_mse"] for r in records if "val_mse" in r]
        assert len(vals) == 2 and result.best["mse"] == min(vals)
        assert all("mse" in r for r in records if "loss" in r)
    finally:
        REGISTRY.pop("test_ridge")


def test_folder_classes_split_by_explicit_lists(folder):
    from metakit.data import DataError, load_split

    lists = {"train": ["class_00", "class_01", "class_02"], "val": ["class_03", "class_04", "class_05"],
             "test": ["class_06", "class_07", "class_08", "class_09"]}
    config = from_dict(folder_config(folder) | {"data": {"dataset": "folder", "path": str(folder),
                                                         "split_classes": lists}})
    for split, names in lists.items():
        assert load_split(config.data, split).class_names == names
    config.data.split_classes = {"train": ["class_99"]}
    with pytest.raises(DataError, match="names 'class_99', not a class folder"):
        load_split(config.data, "train")
    config.data.split_classes = {"tran": ["class_00"]}
    with pytest.raises(DataError, match="unknown split 'tran'"):
        load_split(config.data, "train")


def test_reptile_outer_loop_sgd_without_momentum_and_linear_annealing():
    """Reptile's outer step (Nichol et al. 2018, alg. 1): plain SGD, step annealed linearly to 0."""
    from metakit.engine.fit import make_optimizer, make_scheduler

    config = from_dict({"algorithm": "reptile", "train": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0,
                                                         "lr_schedule": "linear", "steps": 4}})
    learner = torch.nn.Linear(2, 1)
    opt = make_optimizer(learner, config.train)
    sched = make_scheduler(opt, config.train)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        learner.weight.grad = torch.ones_like(learner.weight)
        before = learner.weight.detach().clone()
        opt.step()
        sched.step()
        # no momentum: each step moves by exactly lr * grad
        assert torch.allclose(before - learner.weight.detach(), torch.full_like(before, lrs[-1]))
    assert lrs == [1.0, 0.75, 0.5, 0.25]


def test_max_grad_norm_clips_the_meta_gradient(folder, tmp_path):
    """``train.max_grad_norm``: one plain-SGD step moves the weights by at most lr x the norm."""
    from metakit.engine import load

    def moved(max_norm):
        config = from_dict(folder_config(folder, steps=1, optimizer="sgd", lr=1.0, momentum=0.0, val_every=0,
                                         max_grad_norm=max_norm))
        exp = Experiment(config)
        start = [p.detach().clone() for p in exp.learner.parameters()]
        fit(config, tmp_path / f"run{max_norm}", progress=False, experiment=exp)
        end = load(tmp_path / f"run{max_norm}" / "last.pt").parameters()
        return float(torch.sqrt(sum(((a - b.detach()) ** 2).sum() for a, b in zip(start, end))))

    assert moved(0.0) > 0.05           # unclipped, the step is larger than the cap below
    assert moved(0.01) == pytest.approx(0.01, rel=1e-3)


def test_init_starts_a_new_run_from_a_checkpoints_weights(folder, tmp_path):
    """``fit(init=...)``: the weights come from the checkpoint, step and schedule start at 0, and
    ``init.json`` says where they came from."""
    from metakit.engine.fit import warm_start

    config = from_dict(folder_config(folder, steps=6, val_every=0))
    fit(config, tmp_path / "source", progress=False)
    source = torch.load(tmp_path / "source" / "last.pt", weights_only=False)
    exp = Experiment(config)
    fresh = {k: v.clone() for k, v in exp.learner.state_dict().items()}
    assert any(not torch.equal(fresh[k], source["model"][k]) for k in fresh)
    started = warm_start(tmp_path / "source" / "last.pt", exp.learner, config, None, None)
    assert started["start_step"] == 0 and started["checkpoint_step"] == 6
    assert all(torch.equal(v, source["model"][k]) for k, v in exp.learner.state_dict().items())

    result = fit(config, tmp_path / "tuned", progress=False, init=tmp_path / "source" / "last.pt")
    assert result.step == 6
    assert json.loads((tmp_path / "tuned" / "init.json").read_text())["checkpoint_step"] == 6
    assert [r["lr"] for r in _records(tmp_path / "tuned") if "lr" in r][0] == 1e-2  # its own schedule, from 0


def test_init_step_carries_on_the_checkpoints_schedule(folder, tmp_path, monkeypatch):
    """``init_step``: from the checkpoint's step to train.steps, the learning rate where the schedule
    has it, the sampler reseeded (not replaying the first episodes)."""
    from metakit.engine.fit import warm_start

    config = from_dict(folder_config(folder, steps=12, val_every=0))
    original = Experiment.train_sampler
    monkeypatch.setattr(Experiment, "train_sampler", lambda self: CrashingSampler(original(self), 8))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(config, tmp_path / "first", progress=False)
    monkeypatch.setattr(Experiment, "train_sampler", original)
    weights_only = {k: v for k, v in torch.load(tmp_path / "first" / "last.pt", weights_only=False).items()
                    if k in ("metakit_version", "config", "model", "transform", "step", "best")}
    torch.save(weights_only, tmp_path / "shipped.pt")  # what a shipped checkpoint holds: no optimizer
    assert weights_only["step"] == 6

    result = fit(config, tmp_path / "carried", progress=False, init=tmp_path / "shipped.pt", init_step=True)
    assert result.step == 12
    records = [r for r in _records(tmp_path / "carried") if "lr" in r]
    assert [r["step"] for r in records] == [8, 10, 12]
    assert [r["lr"] for r in records] == pytest.approx([1e-2 / 4, 1e-2 / 4, 1e-2 / 8])  # halved every 4 steps

    exp = Experiment(config)
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(exp.learner.parameters(), lr=1e-2), 4, 0.5)
    reseeded = exp.train_sampler()
    warm_start(tmp_path / "shipped.pt", exp.learner, config, scheduler, reseeded, continue_schedule=True)
    assert not torch.equal(reseeded.sample().query_x, exp.train_sampler().sample().query_x)

    with pytest.raises(CheckpointError, match="nothing left to train"):
        fit(from_dict(folder_config(folder, steps=6, val_every=0)), tmp_path / "over", progress=False,
            init=tmp_path / "shipped.pt", init_step=True)


def test_init_refuses_weights_of_another_architecture(folder, tmp_path):
    fit(from_dict(folder_config(folder, steps=2, val_every=0)), tmp_path / "source", progress=False)
    wider = from_dict({**folder_config(folder, steps=2, val_every=0), "model": {"hidden": 16}})
    with pytest.raises(CheckpointError, match="do not fit a protonet learner"):
        fit(wider, tmp_path / "run", progress=False, init=tmp_path / "source" / "last.pt")
