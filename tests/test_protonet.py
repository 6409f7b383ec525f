"""Prototypical Networks: the loss against a hand computation, adapt against meta_loss."""
import math

import torch
from torch import nn

from metakit.algorithms import ProtoNet
from metakit.algorithms.protonet import prototypes, squared_euclidean
from metakit.tasks import TaskBatch


def test_prototypes_are_class_means():
    z = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [0.0, 5.0], [-2.0, 1.0]]])  # [1, 4, 2]
    y = torch.tensor([[1, 0, 1, 0]])
    protos = prototypes(z, y, 2)
    assert torch.allclose(protos[0, 0], torch.tensor([0.5, 1.5]))  # mean of rows 1 and 3
    assert torch.allclose(protos[0, 1], torch.tensor([0.5, 2.5]))  # mean of rows 0 and 2


def test_meta_loss_matches_hand_computation():
    learner = ProtoNet()
    learner.encoder = nn.Flatten()  # identity embedding: prototypes are pixel means
    # 2-way 2-shot, 1 query per class, images of 1x1x2 "pixels"
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]]).reshape(1, 4, 1, 1, 2)
    support_y = torch.tensor([[0, 0, 1, 1]])  # prototypes (1, 0) and (0, 3)
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]]).reshape(1, 2, 1, 1, 2)
    query_y = torch.tensor([[0, 1]])
    out = learner.meta_loss(TaskBatch(support, support_y, query, query_y, ways=2))
    # query 0: d to (1,0) = 1, to (0,3) = 1 + 4 = 5; query 1: d = 1 + 9 = 10 and 0
    nll0 = -(-1 - math.log(math.exp(-1) + math.exp(-5)))
    nll1 = -(0 - math.log(math.exp(-10) + math.exp(0)))
    assert math.isclose(out.loss.item(), (nll0 + nll1) / 2, rel_tol=1e-5)
    assert torch.allclose(out.logits[0], -torch.tensor([[1.0, 5.0], [10.0, 0.0]]))
    assert out.metrics["accuracy"] == 1.0


def test_squared_euclidean_is_squared_distance():
    a, b = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    assert torch.allclose(squared_euclidean(a, b), torch.cdist(a, b).pow(2), atol=1e-5)


def test_adapt_gives_the_logits_of_meta_loss_in_eval_mode():
    torch.manual_seed(0)
    learner = ProtoNet(ProtoNet.Options(hidden=8)).eval()
    sx, qx = torch.rand(1, 6, 1, 28, 28), torch.rand(1, 9, 1, 28, 28)
    sy, qy = torch.tensor([[2, 0, 1, 2, 0, 1]]), torch.tensor([[0, 1, 2] * 3])
    with torch.no_grad():
        logits = learner.meta_loss(TaskBatch(sx, sy, qx, qy, ways=3)).logits[0]
    predict = learner.adapt(sx[0], sy[0])
    assert torch.allclose(predict(qx[0]), logits, atol=1e-4)


def test_meta_gradient_reaches_every_encoder_parameter():
    torch.manual_seed(0)
    learner = ProtoNet(ProtoNet.Options(hidden=8))
    batch = TaskBatch(torch.rand(2, 4, 1, 28, 28), torch.tensor([[0, 1, 0, 1]] * 2),
                      torch.rand(2, 4, 1, 28, 28), torch.tensor([[0, 1, 1, 0]] * 2), ways=2)
    learner.meta_loss(batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())


def test_augment_distorts_training_images_only():
    """``augment``: Koch's distortions reach the loss in training (the images the encoder sees are
    ``affine_distort``'s under the same random draws) and never in evaluation."""
    from metakit.algorithms.siamese import affine_distort
    torch.manual_seed(0)
    plain = ProtoNet(ProtoNet.Options(hidden=8))
    augmented = ProtoNet(ProtoNet.Options(hidden=8, augment=True))
    augmented.load_state_dict(plain.state_dict())
    sx, qx = torch.rand(1, 4, 1, 28, 28), torch.rand(1, 4, 1, 28, 28)
    sy, qy = torch.tensor([[0, 1, 0, 1]]), torch.tensor([[0, 1, 1, 0]])
    batch = TaskBatch(sx, sy, qx, qy, ways=2)
    torch.manual_seed(1)
    loss = augmented.meta_loss(batch).loss
    torch.manual_seed(1)
    distorted = affine_distort(torch.cat([sx, qx], 1).flatten(0, 1)).view(1, 8, 1, 28, 28)
    expected = plain.meta_loss(TaskBatch(distorted[:, :4], sy, distorted[:, 4:], qy, ways=2)).loss
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, plain.meta_loss(batch).loss, atol=1e-4)
    augmented.load_state_dict(plain.state_dict())  # the same BatchNorm running statistics
    plain.eval(), augmented.eval()
    with torch.no_grad():
        assert torch.equal(augmented.meta_loss(batch).loss, plain.meta_loss(batch).loss)
