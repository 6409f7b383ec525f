"""Backbones: feature extractors and small networks, no algorithm logic."""
from .batchnorm import PerStepBatchNorm2d, set_inner_step
from .conv4 import Conv4, conv_block
from .koch import KochNet
from .mlp import MLP

__all__ = ["Conv4", "KochNet", "MLP", "PerStepBatchNorm2d", "conv_block", "set_inner_step"]
