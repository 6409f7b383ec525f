"""The 4-block convolutional network of Vinyals et al. (2016), used by ProtoNets, MAML and most of the field."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .batchnorm import PerStepBatchNorm2d


POOLS = ("max", "stride")


def conv_block(in_channels: int, out_channels: int, bn_track_running_stats: bool = True,
               pool: str = "max", bn_slots: int = 0) -> nn.Sequential:
    """3x3 conv (padding 1) -> BatchNorm -> ReLU -> 2x2 max-pool (``pool="max"``), or a stride-2
    3x3 conv -> BatchNorm -> ReLU (``pool="stride"``).

    Max-pool runs before ReLU: both are monotone, so ``relu(maxpool(x)) == maxpool(relu(x))``
    exactly, and the ReLU then touches a 4x smaller tensor. ``bn_track_running_stats=False``
    normalises with the statistics of the current batch in training and at test alike (MAML);
    ``bn_slots > 0`` keeps that many sets of running statistics, one per inner step
    (:class:`~metakit.nn.batchnorm.PerStepBatchNorm2d`, MAML++).
    """
    bn = (PerStepBatchNorm2d(out_channels, bn_slots) if bn_slots
          else nn.BatchNorm2d(out_channels, track_running_stats=bn_track_running_stats))
    if pool == "stride":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), bn, nn.ReLU())
    if pool != "max":
        raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), bn, nn.MaxPool2d(2), nn.ReLU())


class Conv4(nn.Module):
    """4 x [3x3 conv ``hidden``, BatchNorm, ReLU, 2x2 max-pool], then flatten.

    ``[M, C, 28, 28] -> [M, hidden]`` (28 -> 14 -> 7 -> 3 -> 1);
    ``[M, C, 84, 84] -> [M, hidden * 25]``. ``out_features`` adds a linear head
    (MAML-style classifier); without it the network is an embedding (ProtoNets).
    Activations run in channels-last memory format, about 1.35x faster on CPU here
    (``benchmarks/RESULTS.md``). ``bn_track_running_stats=False`` keeps no running statistics:
    BatchNorm always uses the current batch's (as in the MAML reference implementation); ``bn_slots``
    keeps running statistics per inner step instead (MAML++, :mod:`metakit.nn.batchnorm`).

    ``blocks`` sets the depth (4, the field's, by default): at 56x56 a fifth block pools the map down to
    1x1 again, ``[M, C, 56, 56] -> [M, hidden]``, where four leave a 3x3 map (a 576-d embedding).

    ``pool="stride"`` is the network of the MAML reference code on Omniglot (github.com/cbfinn/maml:
    ``max_pool`` is off unless asked for, and its Omniglot commands do not ask): stride-2
    convolutions in place of the max-pools, then the mean over the last map, ``[M, C, 28, 28] ->
    [M, hidden, 2, 2] -> [M, hidden]`` (28 -> 14 -> 7 -> 4 -> 2). At 28x28 it does 3.7x fewer
    multiply-adds than the max-pool network (2.65M against 9.8M per image with 64 filters). The
    reference pads as TensorFlow's ``SAME`` does, which on an even side puts the one row and column
    of padding at the bottom and right only; here they go on both sides, with the same map sizes.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, out_features: int | None = None,
                 image_size: int = 28, bn_track_running_stats: bool = True, pool: str = "max",
                 blocks: int = 4, bn_slots: int = 0) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {blocks}")
        self.pool = pool
        self.features = nn.Sequential(*(conv_block(in_channels if i == 0 else hidden, hidden, bn_track_running_stats,
                                                   pool, bn_slots) for i in range(blocks)))
        side = image_size >> blocks  # one 2x2 max-pool (floor) per block
        if pool == "max" and side < 1:
            raise ValueError(f"{blocks} max-pooling blocks need images of at least {2 ** blocks}x{2 ** blocks} "
                             f"pixels, got {image_size}")
        self.embedding_dim = hidden if pool == "stride" else hidden * side * side  # stride: the mean over the map
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None
        self.features.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # [M, C, H, W], stored as [M, H, W, C]
        z = self.features(x)  # [M, hidden, side, side]
        z = z.mean((2, 3)) if self.pool == "stride" else z.flatten(1)  # [M, embedding_dim]
        return self.head(z) if self.head is not None else z
