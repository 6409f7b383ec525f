"""``train.tasks_per_backward``: the meta-batch back-propagated in chunks gives the one-backward
meta-gradient and metrics, for every learner that averages its meta-loss over tasks."""
import copy

import pytest
import torch

from metakit.algorithms import FOMAML, MAML, MatchingNet, MetaLSTM, MetaSGD, ProtoNet, Reptile
from metakit.config import ConfigError, from_dict
from metakit.engine import fit
from metakit.engine.fit import Experiment, meta_backward

from gradient_reference import tiny_batch, tiny_options
from synthetic import folder_config, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

LEARNERS = {
    "maml-batched": (MAML, {}),
    "maml-loop": (MAML, {"batched": False}),
    "fomaml": (FOMAML, {}),
    "metasgd": (MetaSGD, {}),
    "reptile": (Reptile, {"inner_steps": 2}),
    "protonet": (ProtoNet, {}),
    "matching": (MatchingNet, {}),
    "meta_lstm": (MetaLSTM, {"inner_steps": 2}),
}


def grads_and_metrics(learner, batch, tasks_per_backward):
    learner.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same inner minibatches (Reptile) on both sides
    metrics = meta_backward(learner, batch, tasks_per_backward)
    return {k: p.grad.clone() for k, p in learner.named_parameters() if p.grad is not None}, metrics


@pytest.mark.parametrize("name", list(LEARNERS))
def test_chunked_backward_equals_one_backward(name):
    cls, options = LEARNERS[name]
    torch.manual_seed(0)
    learner = cls(tiny_options(cls, **options), image_size=16, ways=3).double().train()
    batch = tiny_batch(B=5)  # chunks of 2, 2 and 1 task: a chunk's weight is its share of the tasks
    start = copy.deepcopy(learner)  # Reptile's inner moments move on with each task: both sides start alike
    whole, whole_metrics = grads_and_metrics(learner, batch, 0)
    chunked, chunked_metrics = grads_and_metrics(start, batch, 2)
    assert whole and chunked.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-10, atol=1e-13, msg=lambda m: f"{k}: {m}")
    assert chunked_metrics.keys() == whole_metrics.keys()
    for k in whole_metrics:
        assert chunked_metrics[k] == pytest.approx(whole_metrics[k], rel=1e-6, abs=1e-9), k  # accuracies are float32 means


def test_fit_with_chunks_trains_the_same_weights(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    weights = []
    fresh = None
    for chunk in (0, 2):  # chunks of 2 and 1 task
        raw = folder_config(folder, steps=3)
        # SGD, not Adam: Adam's normalisation would hide a wrongly scaled meta-gradient
        raw["train"].update(meta_batch_size=3, tasks_per_backward=chunk, val_every=0, optimizer="sgd", lr=0.1)
        if fresh is None:
            fresh = {k: v.clone() for k, v in Experiment(from_dict(raw), need_val=False).learner.state_dict().items()}
        learner = fit(from_dict(raw), tmp_path / f"run{chunk}", progress=False).learner
        weights.append({k: v.clone() for k, v in learner.state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert any(not torch.equal(weights[0][k], v) for k, v in fresh.items())  # it did train


def test_negative_tasks_per_backward_is_refused():
    with pytest.raises(ConfigError, match="train.tasks_per_backward must be >= 0, got -1"):
        from_dict({"train": {"tasks_per_backward": -1}})
