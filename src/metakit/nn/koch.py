"""The convolutional twin of Koch, Zemel & Salakhutdinov (2015), "Siamese Neural Networks for One-shot
Image Recognition", ICML Deep Learning Workshop, sec. 3.1 and fig. 4.

``[M, 1, 105, 105]``: 64@10x10 conv, ReLU, 2x2 max-pool -> 128@7x7, ReLU, max-pool -> 128@4x4, ReLU,
max-pool -> 256@4x4, ReLU -> flatten (256 * 6 * 6 = 9216) -> 4096 fully connected, sigmoid.
All convolutions are "valid" with stride 1 (105 -> 96 -> 48 -> 42 -> 21 -> 18 -> 9 -> 6).
"""
from __future__ import annotations

from torch import Tensor, nn

MIN_SIZE = 65  # the smallest input with a 1x1 map after the last convolution


def koch_side(image_size: int) -> int:
    """Side of the last feature map: 105 -> 6."""
    side = image_size
    for kernel, pool in ((10, True), (7, True), (4, True), (4, False)):
        side = side - kernel + 1
        side = side // 2 if pool else side
    return side


class KochNet(nn.Module):
    """Koch et al.'s twin: ``[M, C, S, S] -> [M, 4096]`` (sigmoid features, S >= 65; 105 in the paper).

    ``init="paper"`` draws conv weights from N(0, 1e-2), fully connected weights from N(0, 0.2) and
    all biases from N(0.5, 1e-2), as in sec. 3.2 ("Weight initialization"); ``"torch"`` keeps
    PyTorch's default initialisation. With the paper's, the 4096 pre-activations start with a
    standard deviation near 10 and about two thirds of the sigmoid units saturated (measured on
    sparse random ink); with PyTorch's they start near 0 (every unit about 0.5).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 105, features: int = 4096, init: str = "paper") -> None:
        super().__init__()
        if image_size < MIN_SIZE:
            raise ValueError(f"Koch's network needs images of at least {MIN_SIZE}x{MIN_SIZE} (105x105 in the paper), "
                             f"got {image_size}: set data.image_size: 105, or use model.backbone: conv4")
        if init not in ("paper", "torch"):
            raise ValueError(f"init must be 'paper' or 'torch', got {init!r}")
        side = koch_side(image_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 10), nn.ReLU(), nn.MaxPool2d(2),  # [M, 64, 48, 48]
            nn.Conv2d(64, 128, 7), nn.ReLU(), nn.MaxPool2d(2),  # [M, 128, 21, 21]
            nn.Conv2d(128, 128, 4), nn.ReLU(), nn.MaxPool2d(2),  # [M, 128, 9, 9]
            nn.Conv2d(128, 256, 4), nn.ReLU(),  # [M, 256, 6, 6]
            nn.Flatten(),
            nn.Linear(256 * side * side, features), nn.Sigmoid(),  # [M, 4096]
        )
        self.embedding_dim = features
        if init == "paper":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    koch_init_(m)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def koch_init_(module: nn.Module) -> None:
    """Koch et al. sec. 3.2: conv weights N(0, 1e-2), linear weights N(0, 0.2), biases N(0.5, 1e-2)."""
    nn.init.normal_(module.weight, 0.0, 1e-2 if isinstance(module, nn.Conv2d) else 0.2)
    if module.bias is not None:
        nn.init.normal_(module.bias, 0.5, 1e-2)
