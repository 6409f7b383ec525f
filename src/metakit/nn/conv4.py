"""The 4-block convolutional network of Vinyals et al. (2016), used by ProtoNets, MAML and most of the field."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def conv_block(in_channels: int, out_channels: int, bn_track_running_stats: bool = True) -> nn.Sequential:
    """3x3 conv (padding 1) -> BatchNorm -> ReLU -> 2x2 max-pool.

    Max-pool runs before ReLU: both are monotone, so ``relu(maxpool(x)) == maxpool(relu(x))``
    exactly, and the ReLU then touches a 4x smaller tensor. ``bn_track_running_stats=False``
    normalises with the statistics of the current batch in training and at test alike (MAML).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=bn_track_running_stats),
        nn.MaxPool2d(2),
        nn.ReLU(),
    )


class Conv4(nn.Module):
    """4 x [3x3 conv ``hidden``, BatchNorm, ReLU, 2x2 max-pool], then flatten.

    ``[M, C, 28, 28] -> [M, hidden]`` (28 -> 14 -> 7 -> 3 -> 1);
    ``[M, C, 84, 84] -> [M, hidden * 25]``. ``out_features`` adds a linear head
    (MAML-style classifier); without it the network is an embedding (ProtoNets).
    Activations run in channels-last memory format, about 1.35x faster on CPU here
    (``benchmarks/RESULTS.md``). ``bn_track_running_stats=False`` keeps no running statistics:
    BatchNorm always uses the current batch's (as in the MAML reference implementation).
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, out_features: int | None = None,
                 image_size: int = 28, bn_track_running_stats: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(*(conv_block(in_channels if i == 0 else hidden, hidden, bn_track_running_stats)
                                        for i in range(4)))
        side = image_size
        for _ in range(4):
            side //= 2
        self.embedding_dim = hidden * side * side
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None
        self.features.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # [M, C, H, W], stored as [M, H, W, C]
        z = self.features(x).flatten(1)  # [M, embedding_dim]
        return self.head(z) if self.head is not None else z
