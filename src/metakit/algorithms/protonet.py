"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Each class is represented by the mean of its embedded support examples (eq. 1),
``c_n = 1/K sum_{(x, y=n)} f(x)``, and a query is classified by a softmax over negative
squared Euclidean distances to the prototypes (eq. 2),
``p(y=n | x) = softmax_n(-||f(x) - c_n||^2)``. The loss is the negative log-probability of
the true class, averaged over queries and tasks. With BatchNorm on batch statistics (training),
each task of a meta-batch goes through the encoder on its own, so its statistics are the task's.
``augment``: Koch et al.'s (2015, sec. 3.2) random affine distortions of every training image
(:func:`metakit.algorithms.siamese.affine_distort`), not in the paper; off by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn import Conv4
from ..tasks import MetaOutput, TaskBatch, accuracy
from .base import Learner, register
from .metric import check_test_shift, embed_tasks, encode, metric_adapt
from .siamese import affine_distort


def prototypes(z_support: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Class means: z_support [B, N*K, D], support_y [B, N*K] -> [B, N, D] (eq. 1)."""
    onehot = F.one_hot(support_y, ways).to(z_support.dtype)  # [B, N*K, N]
    sums = onehot.transpose(1, 2) @ z_support  # [B, N, D]
    return sums / onehot.sum(1).unsqueeze(-1)


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """||a_i - b_j||^2 for a [B, M, D], b [B, N, D] -> [B, M, N]."""
    return (a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1)


@register("protonet")
class ProtoNet(Learner):
    """Conv4 embedding + nearest prototype under squared Euclidean distance."""

    @dataclass
    class Options:
        hidden: int = 64  # conv filters per block
        augment: bool = False  # Koch et al.'s affine distortions of the training images
        blocks: int = 4  # conv blocks; 5 at 56x56 pools to a 64-d embedding again
        test_shift: int = 0  # at test: mean embedding over translations by -n..n px (metric.encode)

    def __init__(self, options: "ProtoNet.Options | None" = None, in_channels: int = 1, image_size: int = 28,
                 **_) -> None:
        super().__init__()
        self.options = options or ProtoNet.Options()
        self.encoder = Conv4(in_channels, self.options.hidden, image_size=image_size, blocks=self.options.blocks)
        check_test_shift(self.options.test_shift)

    def embed(self, x: Tensor) -> Tensor:
        """x [..., C, H, W] -> [..., D]; averaged over ``test_shift`` translations at test."""
        return encode(self.encoder, x, 0 if self.training else self.options.test_shift)

    def logits(self, z_query: Tensor, z_support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """-squared distance to each prototype: [B, M, N] (eq. 2)."""
        return -squared_euclidean(z_query, prototypes(z_support, support_y, ways))

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        S = batch.support_x.shape[1]
        # One encoder pass per task while BatchNorm uses batch statistics, so a task's loss does not
        # depend on which tasks share its meta-batch (nothing changes at meta_batch_size 1, the paper's).
        x = torch.cat([batch.support_x, batch.query_x], dim=1)  # [B, N*K + M, C, H, W]
        if self.training and self.options.augment:
            x = affine_distort(x.flatten(0, 1)).view_as(x)
        z = embed_tasks(self.embed, self.encoder, x)  # [B, N*K + M, D]
        logits = self.logits(z[:, S:], z[:, :S], batch.support_y, batch.ways)  # [B, M, N]
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        acc = accuracy(logits, batch.query_y).mean()
        return MetaOutput(loss, logits, {"loss": loss.item(), "accuracy": acc.item()})

    def adapt(self, support_x: Tensor, support_y: Tensor):
        return metric_adapt(self.embed, support_x, support_y,
                            lambda zq, zs, ys, ways: -squared_euclidean(zq, prototypes(zs, ys, ways)))
