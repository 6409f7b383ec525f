"""Shared by the metric-based learners: embedding a meta-batch of tasks, and ``adapt`` to one new task."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``module`` normalises with the statistics of the batch it is given."""
    return any(isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats) for m in module.modules())


def embed_tasks(embed: Callable[[Tensor], Tensor], encoder: nn.Module, x: Tensor) -> Tensor:
    """``x [B, T, C, H, W] -> [B, T, D]``; one encoder pass per task when BatchNorm uses batch statistics,
    so a task's embeddings (and loss) never depend on the other tasks of its meta-batch (as ProtoNet)."""
    if uses_batch_statistics(encoder):
        return torch.stack([embed(x[i]) for i in range(x.shape[0])])
    return embed(x)


def metric_adapt(embed: Callable[[Tensor], Tensor], support_x: Tensor, support_y: Tensor,
                 logits: Callable[[Tensor, Tensor, Tensor, int], Tensor]) -> Callable[[Tensor], Tensor]:
    """``adapt`` of a metric learner: the support set ``[S, C, H, W]`` is embedded once; the predictor
    embeds queries ``[M, C, H, W]`` and returns ``logits(z_query [1, M, D], z_support [1, S, D],
    support_y [1, S], ways)[0]``, ``[M, N]``. Nothing is recorded for autograd."""
    ways = int(support_y.max()) + 1
    with torch.no_grad():
        zs = embed(support_x)[None]  # [1, S, D]

    def predict(query_x: Tensor) -> Tensor:
        with torch.no_grad():
            return logits(embed(query_x)[None], zs, support_y[None], ways)[0]
    return predict
