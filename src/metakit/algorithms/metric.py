"""Shared by the metric-based learners: embedding a meta-batch of tasks."""
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
