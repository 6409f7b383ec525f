"""Siamese networks: both contrastive forms and Koch's head by hand, pairs, distortions, Koch's net, a short run."""
import math

import pytest
import torch
from torch import nn

from metakit.algorithms import Siamese
from metakit.algorithms.siamese import affine_distort, contrastive_loss
from metakit.config import from_dict
from metakit.data import ClassDataset, EpisodeSampler, load_split
from metakit.data.pairs import Pairs, PairSampler, episode_pairs
from metakit.engine import evaluate, fit
from metakit.engine.fit import Experiment
from metakit.engine.protocols import verification_accuracy
from metakit.nn import KochNet
from metakit.tasks import TaskBatch

from conftest import assert_adapt_equals_evaluation
from synthetic import folder_config, make_image_folder


pytestmark = pytest.mark.usefixtures("one_thread")


def identity_siamese(**options) -> Siamese:
    learner = Siamese(Siamese.Options(hidden=4, augment=False, **options))
    learner.encoder = nn.Flatten()  # embedding = pixels
    return learner


@pytest.mark.parametrize("squared", [False, True])
def test_contrastive_loss_by_hand_at_and_beyond_the_margin(squared):
    m = 2.0
    d = torch.tensor([0.5, 3.0, 0.5, 2.0, 3.0, 1.5])
    same = torch.tensor([1, 1, 0, 0, 0, 0])  # two positives; negatives inside, at and beyond the margin
    if squared:  # Hadsell et al. 2006: 1/2 d^2 and 1/2 max(0, m - d)^2
        terms = [0.5 * 0.25, 0.5 * 9.0, 0.5 * 1.5 ** 2, 0.0, 0.0, 0.5 * 0.25]
    else:  # the linear form: d and max(0, m - d)
        terms = [0.5, 3.0, 1.5, 0.0, 0.0, 0.5]
    per_pair = contrastive_loss(d, same, m, squared, reduction="none")
    assert torch.allclose(per_pair, torch.tensor(terms))
    assert math.isclose(contrastive_loss(d, same, m, squared, "sum").item(), sum(terms), rel_tol=1e-6)
    assert math.isclose(contrastive_loss(d, same, m, squared).item(), sum(terms) / 6, rel_tol=1e-6)
    # at and beyond the margin a negative pair neither costs nor pulls
    dd = torch.tensor([2.0, 3.0], requires_grad=True)
    contrastive_loss(dd, torch.tensor([0, 0]), m, squared, "sum").backward()
    assert torch.all(dd.grad == 0)


def test_eval_loss_is_the_contrastive_loss_of_every_query_support_pair():
    learner = identity_siamese(loss="contrastive", margin=3.0).eval()
    support = torch.tensor([[0.0, 0.0], [4.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    query = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    batch = TaskBatch(support, torch.tensor([[0, 1]]), query, torch.tensor([[0, 1]]), ways=2)
    out = learner.meta_loss(batch)
    # distances: q0-s0 1 (same), q0-s1 sqrt(17) (diff, beyond m=3), q1-s0 1 (diff), q1-s1 3 (same)
    assert math.isclose(out.loss.item(), (1 + 0 + (3 - 1) + 3) / 4, rel_tol=1e-6)
    assert torch.allclose(out.logits[0], -torch.tensor([[1.0, math.sqrt(17)], [1.0, 3.0]]))
    assert out.metrics["accuracy"] == 0.5  # q1 is nearer s0 (1 < 3)


def test_koch_similarity_is_the_weighted_l1_distance_through_a_linear_unit():
    learner = identity_siamese(loss="koch")
    with torch.no_grad():
        learner.head = nn.Linear(3, 1)
        learner.head.weight.copy_(torch.tensor([[-1.0, 2.0, -0.5]]))
        learner.head.bias.fill_(0.25)
    x1 = torch.tensor([[1.0, 0.0, 2.0]]).reshape(1, 1, 1, 3)
    x2 = torch.tensor([[0.0, 0.5, -2.0]]).reshape(1, 1, 1, 3)
    logit = -1.0 * 1 + 2.0 * 0.5 - 0.5 * 4 + 0.25
    assert math.isclose(learner.similarity(x1, x2).item(), logit, rel_tol=1e-6)
    assert learner.same_threshold == 0.0  # p = sigmoid(logit) > 0.5
    batch = TaskBatch(x2.unsqueeze(0), torch.tensor([[0]]), x1.unsqueeze(0), torch.tensor([[0]]), ways=1)
    out = learner.eval().meta_loss(batch)
    assert math.isclose(out.loss.item(), -math.log(1 / (1 + math.exp(-logit))), rel_tol=1e-5)


def test_nearest_and_mean_shot_rules():
    scores = torch.tensor([[[0.9, 0.1, 0.5, 0.6]]])  # one query, 4 support examples of classes 0, 0, 1, 1
    support_y = torch.tensor([[0, 0, 1, 1]])
    nearest = identity_siamese(shots_rule="nearest").class_logits(scores, support_y, 2)
    mean = identity_siamese(shots_rule="mean").class_logits(scores, support_y, 2)
    assert torch.allclose(nearest, torch.tensor([[[0.9, 0.6]]]))
    assert torch.allclose(mean, torch.tensor([[[0.5, 0.55]]]))


@pytest.mark.parametrize("loss", ["koch", "contrastive"])
def test_adapt_gives_the_logits_of_meta_loss_and_gradients_reach_every_parameter(loss):
    torch.manual_seed(0)
    learner = Siamese(Siamese.Options(loss=loss, hidden=8, pairs=16))
    sx, qx = torch.rand(1, 6, 1, 28, 28), torch.rand(1, 6, 1, 28, 28)
    sy, qy = torch.tensor([[2, 0, 1, 2, 0, 1]]), torch.tensor([[0, 1, 2] * 2])
    learner.meta_loss(TaskBatch(sx, sy, qx, qy, ways=3)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    assert_adapt_equals_evaluation(learner, TaskBatch(sx, sy, qx, qy, ways=3), task=0)


def test_episode_pairs_are_balanced_valid_and_seeded():
    labels = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2], [3, 3, 1, 1, 0, 0, 2, 2, 4]]) % 5  # [B=2, M=9]
    g = torch.Generator().manual_seed(0)
    first, second, same = episode_pairs(labels, pairs=101, positive_fraction=0.3, generator=g)
    assert same.shape == (2, 101) and int(same[0].sum()) == int(same[1].sum()) == 30
    a, b = labels.gather(1, first), labels.gather(1, second)
    assert torch.all(first != second)  # never an example with itself
    assert torch.all((a == b) == same)  # positives share a class, negatives do not
    assert not torch.any((labels[1, first[1]] == 4) & same[1])  # the lone example of class 4 has no positive
    again = episode_pairs(labels, 101, 0.3, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip((first, second, same), again))
    with pytest.raises(ValueError, match="2 examples per class"):
        episode_pairs(torch.tensor([[0, 1, 2]]), 4, 0.5)


def test_pair_sampler_balance_and_disjointness():
    counts = [5, 2, 7, 3, 1]  # unequal classes; class 4 cannot give a positive pair
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    images = torch.arange(len(targets), dtype=torch.uint8).view(-1, 1, 1, 1)  # pixel = row
    ds = ClassDataset(images, targets, [f"c{c}" for c in range(5)])
    sampler = PairSampler(ds, pairs=400, positive_fraction=0.25, seed=1)
    p = sampler.sample()
    assert int(p.same.sum()) == 100 and p.same.numel() == 400
    assert torch.all(p.first != p.second)  # two distinct examples in every pair
    assert torch.all((targets[p.first] == targets[p.second]) == p.same)
    assert not torch.any(targets[p.first][p.same] == 4)
    assert torch.equal((p.x1 * 255).round().long().flatten(), p.first)  # images are the rows named
    assert set(targets[p.first[~p.same]].tolist()) == set(range(5))  # negatives reach every class
    q = PairSampler(ds, pairs=400, positive_fraction=0.25, seed=1).sample()
    assert torch.equal(q.first, p.first) and torch.equal(q.second, p.second)


def test_affine_distortion_identity_at_probability_zero_and_keeps_the_ink():
    torch.manual_seed(0)
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 9:19, 11:17] = 1.0
    assert torch.allclose(affine_distort(x, probability=0.0), x, atol=1e-5)
    y = affine_distort(x, probability=1.0)
    assert y.shape == x.shape and not torch.allclose(y, x, atol=1e-3)
    ratio = y.sum((1, 2, 3)) / x.sum((1, 2, 3))  # area changes by the determinant: within 0.8^2*(1-0.09)..1.2^2*1.09
    assert torch.all(ratio > 0.5) and torch.all(ratio < 1.7)


def test_koch_network_shape_at_105_and_clear_error_below_65():
    net = KochNet(image_size=105)
    z = net(torch.rand(2, 1, 105, 105))
    assert z.shape == (2, 4096) and torch.all((z >= 0) & (z <= 1))  # sigmoid units
    assert net.features[-2].in_features == 256 * 6 * 6
    with pytest.raises(ValueError, match="at least 65x65"):
        KochNet(image_size=28)


def test_verification_accuracy_by_hand():
    learner = identity_siamese(loss="contrastive", margin=2.0)  # "same" when d < 1
    x1 = torch.zeros(4, 1, 1, 1)
    x2 = torch.tensor([0.5, 3.0, 0.2, 1.5]).view(4, 1, 1, 1)
    pairs = Pairs(x1, x2, torch.tensor([True, True, False, False]), torch.arange(4), torch.arange(4))
    r = verification_accuracy(learner, pairs)
    # said same: d 0.5 yes, 3.0 no, 0.2 yes, 1.5 no -> right on pairs 0 and 3
    assert r["accuracy"] == 0.5 and r["true_positive_rate"] == 0.5 and r["true_negative_rate"] == 0.5
    assert r["threshold"] == -1.0 and r["pairs"] == 4


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("siamese_images"), classes=12, per_class=8)


@pytest.mark.parametrize("loss, lr, steps", [("contrastive", 1e-2, 40), ("koch", 3e-3, 60)])
def test_short_run_classifies_clearly_above_chance(loss, lr, steps, image_folder, tmp_path):
    values = folder_config(image_folder, steps=steps, ways=3, shots=1, queries=3, val_every=0, log_every=10, lr=lr,
                           lr_step=0)
    values.update(algorithm="siamese", model={"hidden": 8, "loss": loss, "augment": False, "pairs": 32})
    config = from_dict(values)
    experiment = Experiment(config)
    test = load_split(config.data, "test")  # 3 classes never seen in training
    before = evaluate(experiment.learner, EpisodeSampler(test, 3, 1, 4, seed=0), 60)["accuracy"]
    result = fit(config, tmp_path / "run", progress=False, experiment=experiment)
    after = evaluate(result.learner, EpisodeSampler(test, 3, 1, 4, seed=0), 60)["accuracy"]
    assert after > 0.75 and after > before + 0.25, (before, after)  # chance: 1/3
