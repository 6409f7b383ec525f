"""A multi-layer perceptron, e.g. the 1 -> 40 -> 40 -> 1 ReLU network of MAML's sinusoid experiment."""
from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """``[M, in_features] -> [M, out_features]`` through ``hidden`` ReLU layers."""

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
