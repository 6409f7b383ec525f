"""Shared by the metric-based learners: embedding images (with test-time translations), a meta-batch of
tasks, and ``adapt`` to one new task."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``module`` normalises with the statistics of the batch it is given."""
    return any(isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats) for m in module.modules())


def check_test_shift(shift) -> None:
    """A clear message when the learner is built, not after training, for a bad ``model.test_shift``."""
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"model.test_shift must be a whole number of pixels >= 0, got {shift!r}")


def encode(encoder: nn.Module, x: Tensor, shift: int = 0) -> Tensor:
    """``x [..., C, H, W] -> [..., D]``, one encoder pass for all leading dims.

    With ``shift`` n > 0 (test-time augmentation, not in the metric papers): the mean of the
    embeddings of ``(2n + 1)^2`` copies of each image translated by every whole number of pixels
    from -n to n in each direction, edges repeated (the background, on Omniglot). Each copy is its
    own encoder pass, so BatchNorm on batch statistics sees batches of the usual size.
    """
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])  # [M, C, H, W]
    if shift == 0:
        return encoder(x).reshape(*lead, -1)
    H, W = x.shape[-2:]
    padded = F.pad(x, (shift,) * 4, mode="replicate")  # [M, C, H + 2n, W + 2n]
    total = 0
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            total = total + encoder(padded[..., dy:dy + H, dx:dx + W])  # [M, D]
    return (total / (2 * shift + 1) ** 2).reshape(*lead, -1)


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
