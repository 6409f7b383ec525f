"""Matching Networks: cosine attention by hand, rows summing to one, eq. 1, full-context embeddings, a short run."""
import math

import pytest
import torch
from torch import nn

from metakit.algorithms import MatchingNet
from metakit.algorithms.matching import cosine_attention, label_log_probs
from metakit.config import from_dict
from metakit.data import EpisodeSampler, load_split
from metakit.engine import evaluate, fit
from metakit.engine.fit import Experiment
from metakit.tasks import TaskBatch

from conftest import assert_adapt_equals_evaluation
from synthetic import folder_config, make_image_folder


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cosine_attention_by_hand_and_rows_sum_to_one():
    zq = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # [1, 2, 2]
    zs = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])  # [1, 3, 2]
    a = cosine_attention(zq, zs)
    # query 0: cosines 1, 0, -1; query 1: 1/sqrt2, 1/sqrt2, -1/sqrt2
    for row, cos in zip(a[0], ([1.0, 0.0, -1.0], [2 ** -0.5, 2 ** -0.5, -(2 ** -0.5)])):
        e = [math.exp(c) for c in cos]
        assert torch.allclose(row, torch.tensor([v / sum(e) for v in e]), atol=1e-6)
    a = cosine_attention(torch.randn(4, 7, 16), torch.randn(4, 10, 16), scale=5.0)
    assert torch.allclose(a.sum(-1), torch.ones(4, 7), atol=1e-6) and torch.all(a > 0)


def test_eq1_sums_attention_per_class_and_the_loss_is_its_negative_log():
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])  # [1, 1, 4]
    support_y = torch.tensor([[1, 0, 1, 2]])
    assert torch.allclose(label_log_probs(attention, support_y, 3).exp(), torch.tensor([[[0.2, 0.4, 0.4]]]))
    learner = MatchingNet(MatchingNet.Options(hidden=4))
    learner.encoder = nn.Flatten()  # embedding = pixels
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 1, 2)
    query = torch.tensor([[3.0, 1.0]]).reshape(1, 1, 1, 1, 2)
    out = learner.meta_loss(TaskBatch(support, torch.tensor([[0, 1]]), query, torch.tensor([[0]]), ways=2))
    c0, c1 = 3 / math.sqrt(10), 1 / math.sqrt(10)
    assert math.isclose(out.loss.item(), -math.log(math.exp(c0) / (math.exp(c0) + math.exp(c1))), rel_tol=1e-5)
    assert out.metrics["accuracy"] == 1.0


@pytest.mark.parametrize("fce", [False, True])
def test_adapt_gives_the_logits_of_meta_loss_and_gradients_reach_every_parameter(fce):
    torch.manual_seed(0)
    learner = MatchingNet(MatchingNet.Options(hidden=8, fce=fce, fce_steps=3))
    sx, qx = torch.rand(2, 6, 1, 28, 28), torch.rand(2, 6, 1, 28, 28)
    sy, qy = torch.tensor([[2, 0, 1, 2, 0, 1]] * 2), torch.tensor([[0, 1, 2] * 2] * 2)
    out = learner.meta_loss(TaskBatch(sx, sy, qx, qy, ways=3))
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(2, 6), atol=1e-5)  # P(y | x, S) sums to one
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    assert_adapt_equals_evaluation(learner, TaskBatch(sx, sy, qx, qy, ways=3), task=1)


def test_full_context_embeddings_follow_appendix_a():
    torch.manual_seed(0)
    learner = MatchingNet(MatchingNet.Options(hidden=4, fce=True, fce_steps=2)).eval()
    ctx = learner.context
    zs, zq = torch.randn(1, 3, 4), torch.randn(1, 2, 4)
    with torch.no_grad():
        fq, gs = learner.contextual(zq, zs)
        out, _ = ctx.support_lstm(zs)
        assert torch.allclose(gs, out[..., :4] + out[..., 4:] + zs)  # g = fwd + bwd + g'
        x, h, c, r = zq[0], torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4)
        for _ in range(2):  # the attention LSTM written out, one query at a time
            h, c = ctx.query_cell(torch.cat([x, r], -1), (h, c))
            h = h + x
            r = torch.softmax(h @ gs[0].T, -1) @ gs[0]
        assert torch.allclose(fq[0], h, atol=1e-6)
        # a query's f depends on the support set: change one support example, f changes
        zs2 = zs.clone()
        zs2[0, 0] += 1.0
        assert not torch.allclose(learner.contextual(zq, zs2)[0], fq)


def test_short_run_classifies_clearly_above_chance(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=12, per_class=8)
    values = folder_config(folder, steps=80, ways=3, shots=1, queries=3, val_every=0, log_every=10, lr=3e-3, lr_step=0)
    values.update(algorithm="matching", model={"hidden": 8})
    config = from_dict(values)
    experiment = Experiment(config)
    test = load_split(config.data, "test")
    before = evaluate(experiment.learner, EpisodeSampler(test, 3, 1, 4, seed=0), 60)["accuracy"]
    result = fit(config, tmp_path / "run", progress=False, experiment=experiment)
    after = evaluate(result.learner, EpisodeSampler(test, 3, 1, 4, seed=0), 60)["accuracy"]
    assert after > 0.75 and after > before + 0.2, (before, after)
