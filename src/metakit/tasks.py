"""The types every part of metakit speaks: a batch of tasks in, a loss and logits out.

A task (an *episode*) is a support set to learn from and a query set to be judged on.
Samplers stack ``B`` tasks of equal shape so a learner can process a meta-batch at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """A meta-batch of ``B`` tasks with stacked tensors.

    Classification (N ways, K shots, Q queries per class)::

        support_x  [B, N*K, C, H, W]    support_y  [B, N*K]   labels in 0..N-1
        query_x    [B, N*Q, C, H, W]    query_y    [B, N*Q]

    Regression (K support points, Q query points)::

        support_x  [B, K, 1]   support_y  [B, K, 1]
        query_x    [B, Q, 1]   query_y    [B, Q, 1]

    ``ways`` is ``None`` for regression.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    ways: int | None = None

    @property
    def meta_batch_size(self) -> int:
        return self.support_x.shape[0]

    @property
    def is_classification(self) -> bool:
        return self.ways is not None

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(self.support_x.to(device), self.support_y.to(device),
                         self.query_x.to(device), self.query_y.to(device), self.ways)

    def task(self, i: int) -> "TaskBatch":
        """Task ``i`` as a batch of one."""
        return self.tasks(i, i + 1)

    def tasks(self, lo: int, hi: int) -> "TaskBatch":
        """Tasks ``lo .. hi - 1`` as a batch (views, no copy)."""
        s = slice(lo, hi)
        return TaskBatch(self.support_x[s], self.support_y[s], self.query_x[s], self.query_y[s], self.ways)


def cat_batches(batches: list[TaskBatch]) -> TaskBatch:
    """Concatenate task batches of equal task shape along the meta-batch dimension."""
    return TaskBatch(*(torch.cat([getattr(b, k) for b in batches]) for k in
                       ("support_x", "support_y", "query_x", "query_y")), ways=batches[0].ways)


@dataclass
class MetaOutput:
    """What ``learner.meta_loss(batch)`` returns.

    ``loss`` is a scalar, differentiable w.r.t. the learner's meta-parameters;
    ``logits`` are the query predictions ``[B, N*Q, N]`` (classification) or ``[B, Q, 1]``
    (regression); ``metrics`` hold detached floats for logging (``loss``, ``accuracy`` or ``mse``).
    """

    loss: Tensor
    logits: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-task accuracy: logits [B, M, N], targets [B, M] -> [B]."""
    return (logits.argmax(-1) == targets).float().mean(-1)
